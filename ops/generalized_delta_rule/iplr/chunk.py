"""Chunkwise (training) form of the IPLR delta rule: the DPLR chunk kernels without decay (USE_GK=False).

    S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t     (state [K, V])
"""
from ops.common.compile_ahead import first_call
from ops.generalized_delta_rule.dplr.chunk import ChunkDPLRFunction, check_chunk_size, fitting_chunk_size
from ops.generalized_delta_rule.utils import check_inputs


@first_call
def chunk_iplr_delta_rule(q, k, v, a, b, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                          chunk_size=64):
    """The IPLR delta rule in chunkwise form, fla layout (fla 0.6.0's chunk_iplr_delta_rule).

    q, k, a, b [B, T, H, K], v [B, T, H, V] (one dtype: float16, bfloat16, float32 or float64); scale defaults to
    K^-0.5; initial_state [N, H, K, V]; cu_seqlens (int [N + 1], B == 1) packs N sequences; chunk_size in
    (16, 32, 64) (at most 32 for float64 with K > 128). Returns (o [B, T, H, V] in q's dtype, final state
    [N, H, K, V] (float32; float64 for float64 inputs) when output_final_state else None). Differentiable in q, k,
    v, a, b and initial_state."""
    *_, scale = check_inputs(q, k, v, a, b, None, scale, initial_state, cu_seqlens)
    check_chunk_size(chunk_size)
    return ChunkDPLRFunction.apply(q, k, v, a, b, None, scale, initial_state, bool(output_final_state), cu_seqlens,
                                   fitting_chunk_size(chunk_size, q.dtype, q.shape[-1]))
