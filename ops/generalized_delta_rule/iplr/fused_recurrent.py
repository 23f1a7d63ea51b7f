"""The IPLR delta rule token by token: the DPLR fused recurrent kernels without decay (USE_GK=False).

    w_t = S_{t-1}^T a_t,   S_t = S_{t-1} + b_t w_t^T + k_t v_t^T,   o_t = scale S_t^T q_t
(backward: checkpointed reverse recurrence, see ops/generalized_delta_rule/dplr/fused_recurrent.py).
"""
from ops.common.compile_ahead import first_call
from ops.generalized_delta_rule.dplr.fused_recurrent import FusedRecurrentDPLRFunction
from ops.generalized_delta_rule.utils import check_inputs


@first_call
def fused_recurrent_iplr_delta_rule(q, k, v, a, b, scale=None, initial_state=None, output_final_state=False,
                                    cu_seqlens=None):
    """The IPLR delta rule token by token (fla 0.6.0's fused_recurrent_iplr_delta_rule).

    q, k, a, b [B, T, H, K], v [B, T, H, V] (one dtype), scale (default K^-1/2), initial_state [N, H, K, V],
    cu_seqlens int [N + 1] packing N sequences along T (B must be 1). Returns (o [B, T, H, V] in q's dtype,
    final state [N, H, K, V] in float32 (float64 for float64 inputs) or None). Differentiable in q, k, v, a, b
    and initial_state."""
    *_, scale = check_inputs(q, k, v, a, b, None, scale, initial_state, cu_seqlens)
    return FusedRecurrentDPLRFunction.apply(q, k, v, a, b, None, scale, initial_state, bool(output_final_state),
                                            cu_seqlens)
