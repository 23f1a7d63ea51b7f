"""DPLR delta rule: S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t
(chunk and fused recurrent)."""
from ops.generalized_delta_rule.dplr.chunk import chunk_dplr_delta_rule
from ops.generalized_delta_rule.dplr.fused_recurrent import fused_recurrent_dplr_delta_rule

__all__ = ["chunk_dplr_delta_rule", "fused_recurrent_dplr_delta_rule"]
