"""The quadratic ("parallel", attention-like) form of the delta rule, forward and backward in Triton.

Per sequence and head, the whole sequence is one chunk: with L = I + tril(diag(beta) K K^T, -1), M the inclusive
causal mask and Ut = L^-1 diag(beta) (V - K S0),

    o = scale Q S0 + scale (Q K^T * M) Ut = scale Q S0 + A (V - K S0),    A = scale (Q K^T * M) L^-1 diag(beta).

Kernels (parallel_fwd.py, parallel_bwd.py): a blocked forward substitution for Ut, a causal linear attention for o;
in backward a blocked backward substitution for dR = L^-T dUt, then row-block (dq, dbeta, part of dk), column-block
(rest of dk) and state (dS0) kernels. Everything is quadratic in T; no T x T matrix and no state is stored
(except the returned attention matrix when asked for).
"""
import torch
import triton

from ops.common.compile_ahead import first_call
from ops.common.utils import (
    acc_dtype,
    block_size,
    check_cu_seqlens,
    check_qkv,
    check_state,
    check_tensor,
    chunk_index,
    default_scale,
    dot_precision,
    new_empty,
    quadratic_block_rows,
    scale_arg,
    tl_acc,
)
from ops.delta_rule.parallel_bwd import cols_bwd_kernel, rows_bwd_kernel, solve_bwd_kernel, state_bwd_kernel
from ops.delta_rule.parallel_fwd import output_fwd_kernel, solve_fwd_kernel

NUM_WARPS = 4
MAX_TILE = 64  # widest K / V column chunk of a tile (tests shrink it to reach the multi-chunk paths)


def _meta(dtype, K, V, C):
    """Tile sizes: C rows, K and V in chunks of at most MAX_TILE columns."""
    return dict(C=C, BK=min(MAX_TILE, block_size(K)), BV=min(MAX_TILE, block_size(V)), ACC=tl_acc(dtype),
                DOT_PREC=dot_precision(dtype), num_warps=NUM_WARPS)




def _forward(q, k, v, beta, scale, s0, offsets, chunks, C, identity=False):
    """(o [B, T, H, V] in q's dtype, Ut [B, T, H, V] in the accumulation dtype). With identity=True, V is the
    identity over token columns (v unused, V = T) and o is the attention matrix A as [B, T, H, T]."""
    B, T, H, K = q.shape
    V = T if identity else v.shape[-1]
    N, NC = offsets.numel() - 1, chunks.shape[0]
    meta = _meta(q.dtype, K, V, C)
    scale_t = scale_arg(scale, q.dtype, q.device)
    ut = new_empty((B, T, H, V), acc_dtype(q.dtype), q.device)
    o = new_empty((B, T, H, V), q.dtype, q.device)
    if B * T == 0 or H == 0:
        return o, ut
    dummy = q
    solve_fwd_kernel[(N * H, triton.cdiv(V, meta["BV"]))](
        k, dummy if identity else v, beta, dummy if s0 is None else s0, ut, offsets, T, H, K, V,
        HAS_S0=s0 is not None, IDENTITY_V=identity, **meta)
    output_fwd_kernel[(NC, H, triton.cdiv(V, meta["BV"]))](
        q, k, ut, dummy if s0 is None else s0, o, offsets, chunks, scale_t, H, K, V, HAS_S0=s0 is not None, **meta)
    return o, ut


def _backward(q, k, v, beta, scale, s0, ut, do, offsets, chunks, C, need_ds0):
    """(dq, dk, dv, dbeta, dS0 or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N, NC = offsets.numel() - 1, chunks.shape[0]
    meta = _meta(q.dtype, K, V, C)
    acc = acc_dtype(q.dtype)
    scale_t = scale_arg(scale, q.dtype, q.device)
    NK = triton.cdiv(K, meta["BK"])
    dr = new_empty((B, T, H, V), acc, q.device)
    dv = new_empty(v.shape, v.dtype, q.device)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk_rows = new_empty(k.shape, acc, q.device)
    dk = new_empty(k.shape, k.dtype, q.device)
    dbeta_parts = new_empty((NK, B * T, H), acc, q.device)
    ds0 = new_empty(s0.shape, s0.dtype, q.device) if need_ds0 else None
    if B * T == 0 or H == 0:
        return dq, dk, dv, beta.new_zeros(beta.shape), None if ds0 is None else ds0.zero_()
    dummy = q
    s0_arg = dummy if s0 is None else s0
    solve_bwd_kernel[(N * H, triton.cdiv(V, meta["BV"]))](q, k, beta, do, dr, dv, offsets, scale_t, H, K, V, **meta)
    rows_bwd_kernel[(NC, H, NK)](q, k, v, beta, s0_arg, ut, do, dr, dq, dk_rows, dbeta_parts, offsets, chunks, scale_t,
                                 B * T, H, K, V, HAS_S0=s0 is not None, **meta)
    cols_bwd_kernel[(NC, H, NK)](q, k, beta, ut, do, dr, dk_rows, dk, offsets, chunks, scale_t, H, K, V, **meta)
    if need_ds0:
        state_bwd_kernel[(N * H, NK, triton.cdiv(V, meta["BV"]))](q, k, beta, do, dr, ds0, offsets, scale_t, H, K, V,
                                                                  **meta)
    dbeta = dbeta_parts.sum(0).view(B, T, H).to(beta.dtype)
    return dq, dk, dv, dbeta, ds0


class ParallelDeltaRuleFunction(torch.autograd.Function):
    """o = scale Q S0 + scale (Q K^T * M) L^-1 diag(beta) (V - K S0); gradients for q, k, v, beta, S0."""

    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, offsets, chunks, chunk_size):
        o, ut = _forward(q, k, v, beta, scale, initial_state, offsets, chunks, chunk_size)
        ctx.save_for_backward(q, k, v, beta, initial_state, ut, offsets, chunks)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, s0, ut, offsets, chunks = ctx.saved_tensors
        need_ds0 = s0 is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dbeta, ds0 = _backward(q, k, v, beta, ctx.scale, s0, ut, do.contiguous(), offsets, chunks,
                                           ctx.chunk_size, need_ds0)
        return dq, dk, dv, dbeta, None, ds0, None, None, None


@first_call
def parallel_delta_rule(q, k, v, beta, scale=None, initial_state=None, output_attentions=False, cu_seqlens=None,
                        chunk_size=None):
    """The delta rule in its quadratic form.

    q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] (one dtype), initial_state [N, H, K, V] or None,
    cu_seqlens int [N + 1] (B = 1) or None. Returns (o [B, T, H, V], attn or None): attn is the matrix A with
    o = scale Q S0 + A (V - K S0), as [B, H, T, T] (varlen: [1, H, T, T], block diagonal over the sequences);
    it is an analysis output, not differentiated. chunk_size (rows per block, a power of two >= 16) is a tuning
    knob; the default suits the head sizes."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_tensor("beta", beta, ndim=3, shape=(B, T, H), device=q.device, dtype=q.dtype)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    check_state(initial_state, N, H, K, V, q.device)
    scale = default_scale(scale, K)
    if chunk_size is None:
        chunk_size = quadratic_block_rows(K, V)
    elif not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    s0 = None if initial_state is None else initial_state.contiguous()
    offsets, chunks, _, _ = chunk_index(cu_seqlens, B, T, chunk_size, q.device)
    o = ParallelDeltaRuleFunction.apply(q, k, v, beta, scale, s0, offsets, chunks, chunk_size)
    attn = None
    if output_attentions:
        with torch.no_grad():
            a, _ = _forward(q, k, None, beta, scale, None, offsets, chunks, chunk_size, identity=True)
        attn = a.permute(0, 2, 1, 3).contiguous()
    return o, attn
