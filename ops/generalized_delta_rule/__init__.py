"""The generalized delta rule (fla's conventions, state [K, V]; fla writes the transposed form):

    IPLR:  S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T
    DPLR:  S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,     o_t = scale S_t^T q_t

Each in chunkwise (training) and fused recurrent (decode) form; IPLR runs the DPLR kernels without decay."""
from ops.generalized_delta_rule.dplr import chunk_dplr_delta_rule, fused_recurrent_dplr_delta_rule
from ops.generalized_delta_rule.iplr import chunk_iplr_delta_rule, fused_recurrent_iplr_delta_rule

__all__ = ["chunk_iplr_delta_rule", "fused_recurrent_iplr_delta_rule", "chunk_dplr_delta_rule",
           "fused_recurrent_dplr_delta_rule"]
