"""Chunkwise (training) form of the delta rule: a thin autograd Function over the Triton kernels.

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t

Forward:  wy_fwd (W, U, X per chunk) -> chunk_h_fwd (states h_n, v_new, final state) -> chunk_o_fwd (o).
Backward: chunk_dv_local -> chunk_h_bwd (dh, dv_new, dS0) -> chunk_o_bwd (dq, dk part, dW) -> wy_bwd (dk, dv, dbeta).
With utils.FUSED_STATE (default), chunk_h_bwd computes dv_local (no chunk_dv_local) and, where its grid fills the
GPU, chunk_h_fwd computes o (no chunk_o_fwd).
"""
import torch

import ops.common.utils as U
from ops.common.compile_ahead import first_call
from ops.delta_rule import chunk_o, wy_fast
from ops.delta_rule.chunk_h import chunk_h_bwd, chunk_h_fwd
from ops.delta_rule.chunk_o import chunk_dv_local, chunk_o_bwd, chunk_o_fwd
from ops.delta_rule.wy_fast import wy_bwd, wy_fwd

CHUNK_SIZES = (16, 32, 64)




def chunk_delta_rule_states(k, v, beta, initial_state, output_final_state, idx, chunk_size, q=None, scale_t=None):
    """The forward up to the output: wy_fwd and chunk_h_fwd. Returns (X, W, h, v_new), what the backward reads,
    the final state (or None) and, given q and scale_t, the output o from the state pass (else None)."""
    offsets, cmap, chunk_offsets, NC = idx
    w, u, x = wy_fwd(k, v, beta, offsets, cmap, chunk_size)
    h, v_new, ht, o = chunk_h_fwd(k, w, u, initial_state, output_final_state, offsets, chunk_offsets, NC, chunk_size,
                                  q=q, scale_t=scale_t)
    return (x, w, h, v_new), ht, o


def chunk_delta_rule_fwd(q, k, v, beta, scale_t, initial_state, output_final_state, idx, chunk_size):
    fused = U.FUSED_STATE
    saved, ht, o = chunk_delta_rule_states(k, v, beta, initial_state, output_final_state, idx, chunk_size,
                                           q=q if fused else None, scale_t=scale_t if fused else None)
    if o is None:  # (not fused, or the state pass's grid leaves SMs idle: chunk_h_fwd's docstring)
        _, _, h, v_new = saved
        o = chunk_o_fwd(q, k, v_new, h, scale_t, idx.offsets, idx.cmap, chunk_size)
    return o, ht, saved


def backward_storage(dtype, chunk_size, K, V):
    """(dv_new's, dW's) storage dtypes: read only as dot operands (dv_new by chunk_o_bwd and wy_bwd, dW by wy_bwd),
    they are stored in their readers' operand type and compute the same (utils.read_storage)."""
    op_o, op_wy = chunk_o.bwd_operands(dtype, chunk_size, K, V), wy_fast.bwd_operands(dtype, chunk_size, K, V)
    return U.read_storage(dtype, op_o, op_wy), U.read_storage(dtype, op_wy)


def chunk_delta_rule_bwd(q, k, v, beta, scale_t, initial_state, do, dht, saved, idx, chunk_size):
    offsets, cmap, chunk_offsets, NC = idx
    x, w, h, v_new = saved
    dv_new_dtype, dw_dtype = backward_storage(k.dtype, chunk_size, k.shape[-1], v.shape[-1])
    dv_local = None if U.FUSED_STATE else chunk_dv_local(q, k, do, scale_t, offsets, cmap, chunk_size)
    dh, dv_new, ds0 = chunk_h_bwd(q, k, w, do, dv_local, dht, initial_state, scale_t, offsets, chunk_offsets, NC,
                                  chunk_size, dv_new_dtype=dv_new_dtype)
    dq, dk_part, dw = chunk_o_bwd(q, k, v_new, h, do, dh, dv_new, scale_t, offsets, cmap, chunk_size,
                                  dw_dtype=dw_dtype)
    dk, dv, dbeta = wy_bwd(k, v, beta, x, dw, dv_new, dk_part, offsets, cmap, chunk_size)
    return dq, dk, dv, dbeta, ds0


class ChunkDeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
        B, T = q.shape[:2]
        q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
        if initial_state is not None:
            initial_state = initial_state.contiguous()
        with U.on_device(q.device):
            idx = U.chunk_index(cu_seqlens, B, T, chunk_size, q.device)
            scale_t = U.scale_arg(scale, q.dtype, q.device)
            o, ht, saved = chunk_delta_rule_fwd(q, k, v, beta, scale_t, initial_state, output_final_state, idx,
                                                chunk_size)
        ctx.save_for_backward(q, k, v, beta, initial_state, scale_t, *idx[:3], *saved)
        ctx.chunk_size, ctx.NC = chunk_size, idx.NC
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, beta, initial_state, scale_t, offsets, cmap, chunk_offsets, *saved = ctx.saved_tensors
        idx = U.ChunkIndex(offsets, cmap, chunk_offsets, ctx.NC)
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        with U.on_device(q.device):
            dq, dk, dv, dbeta, ds0 = chunk_delta_rule_bwd(q, k, v, beta, scale_t, initial_state, do, dht, saved,
                                                          idx, ctx.chunk_size)
        return dq, dk, dv, dbeta, None, ds0, None, None, None


@first_call
def chunk_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
                     use_qk_l2norm_in_kernel=False, chunk_size=64):
    """The delta rule in chunkwise (WY) form, fla layout.

    q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] (one dtype: float16, bfloat16, float32 or float64);
    scale defaults to K^-0.5; initial_state [N, H, K, V]; cu_seqlens (int [N + 1], B == 1) packs N sequences;
    use_qk_l2norm_in_kernel l2-normalizes q and k first; chunk_size in (16, 32, 64).
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] (float32; float64 for float64 inputs) when
    output_final_state else None)."""
    B, T, H, K, V = U.check_qkv(q, k, v)
    U.check_tensor("beta", beta, ndim=3, shape=(B, T, H), device=q.device, dtype=q.dtype)
    N = U.check_cu_seqlens(cu_seqlens, B, T, q.device)
    U.check_state(initial_state, N, H, K, V, q.device)
    scale = U.default_scale(scale, K)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")
    if use_qk_l2norm_in_kernel:
        from ops.common.l2norm import l2norm
        q, k = l2norm(q), l2norm(k)
    return ChunkDeltaRuleFunction.apply(q, k, v, beta, scale, initial_state, bool(output_final_state), cu_seqlens,
                                        chunk_size)
