"""Helpers shared by the generalized delta rule kernels (IPLR and DPLR): tile pointers and input checks.

Layout: token tensors are [B*T, H, D] (a sequence of L tokens starting at flat token bos), chunk matrices are
[NC, H, C, C], states [*, H, K, V]; all row-major and contiguous.
"""
import torch
import triton
import triton.language as tl

import ops.common.utils as U


@triton.jit
def seq_block(ptr, bos, i_h, L, H: tl.constexpr, D: tl.constexpr, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Block pointer to rows r0.. (sequence-relative) and columns c0.. of a sequence of a [B*T, H, D] tensor."""
    return tl.make_block_ptr(ptr + (bos * H + i_h) * D, (L, D), (H * D, 1), (r0, c0), (BR, BC), (1, 0))


@triton.jit
def mat_block(ptr, R: tl.constexpr, S: tl.constexpr, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Block pointer into a row-major [R, S] matrix starting at ptr."""
    return tl.make_block_ptr(ptr, (R, S), (S, 1), (r0, c0), (BR, BC), (1, 0))


@triton.jit
def seq_row(ptr, bos, i_h, r, H: tl.constexpr, D: tl.constexpr, c0, BC: tl.constexpr):
    """Columns c0.. of row r (sequence-relative, must be a valid row) of a [B*T, H, D] tensor, as a vector."""
    o = c0 + tl.arange(0, BC)
    return tl.load(ptr + ((bos + r) * H + i_h) * D + o, mask=o < D, other=0)


@triton.jit
def masked_exp(x, mask):
    """exp(x) where mask, else 0; x is never exponentiated outside the mask (no inf * 0)."""
    return tl.where(mask, tl.exp(tl.where(mask, x, 0.0)), 0.0)


def check_inputs(q, k, v, a, b, gk, scale, initial_state, cu_seqlens):
    """Validate the generalized delta rule's inputs; return (B, T, H, K, V, N, scale).
    a, b [B, T, H, K] in q's dtype; gk [B, T, H, K] in q's dtype or float32 (None for IPLR)."""
    B, T, H, K, V = U.check_qkv(q, k, v)
    U.check_tensor("a", a, ndim=4, shape=q.shape, device=q.device, dtype=q.dtype)
    U.check_tensor("b", b, ndim=4, shape=q.shape, device=q.device, dtype=q.dtype)
    if gk is not None:
        U.check_tensor("gk", gk, ndim=4, shape=q.shape, device=q.device)
        if gk.dtype not in (q.dtype, torch.float32):
            raise TypeError(f"gk has dtype {gk.dtype}; expected q's dtype {q.dtype} or float32")
    N = U.check_cu_seqlens(cu_seqlens, B, T, q.device)
    U.check_state(initial_state, N, H, K, V, q.device)
    return B, T, H, K, V, N, U.default_scale(scale, K)


def state_tile(K, V, budget, dtype, min_v=16):
    """(BK, BV) for a program holding all K rows and BV columns of the state: BK * BV <= budget elements
    (halved for float64), BV at least min_v."""
    if dtype == torch.float64:
        budget //= 2
    BK = U.block_size(K)
    BV = min(U.block_size(V, minimum=min_v), max(min_v, triton.next_power_of_2(budget // BK)))
    return BK, BV
