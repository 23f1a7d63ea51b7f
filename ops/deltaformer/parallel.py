"""DeltaFormer attention: u = (I + diag(beta) P)^-1 v, then o = causal softmax attention(q, k, u).

Per sequence and head, S = scale Q K^T, P = strictly causal softmax of S (row 0 empty), A = causal softmax of S
(diagonal included), L = I + diag(b) P (b = beta, 0 on each sequence's first token, whose row of P is empty):

    forward:   lse_s (strict row statistics),  u = L^-1 v (invcum.py),  o = A u with its lse (attention.py).
    backward:  du = A^T dO;   g = L^-T du;   dv = g;
               with w = P u (so that b w = v - u) and dL = -g u^T on the strictly lower part:
               dbeta_i = sum_j dL_ij P_ij = -g_i . w_i,    dP_ij = b_i dL_ij,
               dS = A * (dO u^T - D) + P * (dP - rowsum(P * dP)),   D_i = dO_i . o_i,
                    where P * (dP - rowsum(P * dP)) = P * (-diag(b) g u^T - D_s),  D_s_i = -g_i . (v_i - u_i),
               dq = scale dS K,   dk = scale dS^T Q.
The strict term is the backward of a second attention w = P u with upstream gradient -diag(b) g, so both softmax
adjoints are accumulated in one pass over the logits tiles (attention.attn_bwd_dq_kernel / attn_bwd_dk_kernel).

Memory: no T x T matrix is stored. Saved for backward: u ([B, T, H, V] in the accumulation dtype: float32, or
float64 for float64 inputs), o, and two row statistics lse, lse_s ([B, T, H], accumulation dtype), besides the
inputs q, k, v, beta. Backward allocates du / g (one [B, T, H, V] accumulation buffer, g overwrites du in place),
the row terms D, D_s ([B, T, H]) and the gradients. Work is O(T^2 (K + V)) per head; the solve is sequential over
the blocks of a sequence (parallel over sequences, heads and V column chunks), everything else is parallel
over blocks.
"""
import torch

from ops.common.compile_ahead import first_call
from ops.common.utils import acc_dtype, check_cu_seqlens, check_qkv, check_tensor, chunk_index, default_scale
from ops.deltaformer.attention import (
    attention_dqdk,
    attention_dv,
    attention_forward,
    check_chunk_size,
)
from ops.deltaformer.invcum import solve_adjoint_, solve_forward, strict_lse


class DeltaFormerFunction(torch.autograd.Function):
    """o = A (I + diag(b) P)^-1 v; gradients for q, k, v and beta."""

    @staticmethod
    def forward(ctx, q, k, v, beta, scale, offsets, chunks, C):
        lse_s = strict_lse(q, k, scale, offsets, chunks, C)
        u = solve_forward(q, k, v, beta, lse_s, scale, offsets, C)
        o, lse = attention_forward(q, k, u, scale, offsets, chunks, C)
        ctx.save_for_backward(q, k, v, beta, u, o, lse, lse_s, offsets, chunks)
        ctx.scale, ctx.C = scale, C
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, beta, u, o, lse, lse_s, offsets, chunks = ctx.saved_tensors
        scale, C = ctx.scale, ctx.C
        do = do.contiguous()
        du = attention_dv(q, k, do, lse, scale, offsets, chunks, C, v.shape[-1], acc_dtype(q.dtype))
        g, dv = solve_adjoint_(q, k, du, beta, lse_s, scale, offsets, C, copy_dtype=v.dtype)
        dq, dk, dbeta = attention_dqdk(q, k, u, do, o, lse, scale, offsets, chunks, C, strict=(g, v, beta, lse_s))
        return dq, dk, dv, dbeta, None, None, None, None


@first_call
def deltaformer_attn(q, k, v, beta=None, scale=None, cu_seqlens=None, chunk_size=None):
    """DeltaFormer attention, differentiable in q, k, v and beta.

        u_i = v_i - beta_i sum_{j<i} softmax_j(scale q_i . k_j over j < i) u_j,   o = causal softmax attention(q, k, u)

    q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] or None (ones), one dtype (float16, bfloat16, float32,
    float64); cu_seqlens int [N + 1] (B = 1) packs N sequences along T; scale defaults to K^-1/2. Returns
    o [B, T, H, V] in the input dtype. chunk_size (rows per block: 16, 32, 64 or 128) is a tuning knob."""
    B, T, H, K, V = check_qkv(q, k, v)
    if beta is not None:
        check_tensor("beta", beta, ndim=3, shape=(B, T, H), device=q.device, dtype=q.dtype)
    check_cu_seqlens(cu_seqlens, B, T, q.device)
    scale = default_scale(scale, K)
    C = check_chunk_size(chunk_size, K, V)
    q, k, v = (x.contiguous() for x in (q, k, v))
    beta = q.new_ones((B, T, H)) if beta is None else beta.contiguous()
    offsets, chunks, _, _ = chunk_index(cu_seqlens, B, T, C, q.device)
    return DeltaFormerFunction.apply(q, k, v, beta, scale, offsets, chunks, C)
