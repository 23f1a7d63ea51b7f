"""Inverse of a unit lower-triangular C x C tile, X = (I + A)^-1 for strictly lower A (C in 16, 32, 64: the chunk
sizes; the tile lives in registers, and at C = 128 Triton's LLVM lowering of it runs for minutes on an H100).

Blocked, all in registers:
  1. the 16 x 16 diagonal blocks of (I + A) are inverted by right-looking forward substitution, all blocks at
     once: for s = 0..14, row s of every block is final and is eliminated from the rows below it in its block,
     X[i, :] -= A[i, j] X[j, :] (j = s-th row of i's block): one masked outer product per step;
  2. blocks are merged pairwise, 16 -> 32 -> 64: with D the block-diagonal inverse computed so far and
     N the lower-left off-diagonal blocks of (I + A) at that width,
     [[L11, 0], [N21, L22]]^-1 = [[X11, 0], [-X22 N21 X11, X22]] = D - D N D   (two tl.dot per level).
"""
import torch
import triton
import triton.language as tl

from ops.common.utils import acc_dtype, check_tensor, dot_precision, new_empty


@triton.jit
def _merge(X, A, rows, cols, WIDTH: tl.constexpr, DOT_PREC: tl.constexpr):
    """X block-diagonal inverse at WIDTH // 2 -> at WIDTH: X - X N X, N = A's off-diagonal halves."""
    HALF: tl.constexpr = WIDTH // 2
    N = tl.where(((rows // WIDTH) == (cols // WIDTH)) & ((rows // HALF) != (cols // HALF)), A, 0.0)
    return X - tl.dot(tl.dot(X, N, input_precision=DOT_PREC), X, input_precision=DOT_PREC)


@triton.jit
def solve_unit_lower(A, C: tl.constexpr, DOT_PREC: tl.constexpr):
    """X = (I + tril(A, -1))^-1 for a [C, C] register tile A (only its strictly lower part is read)."""
    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, C)[None, :]
    same16 = (rows // 16) == (cols // 16)
    A = tl.where(rows > cols, A, 0.0)
    Ad = tl.where(same16, A, 0.0)
    X = tl.where(rows == cols, 1.0, 0.0).to(A.dtype)
    for s in range(15):
        # a[i] = A[i, j(i)] and r[m] = X[j(m), m], with j(.) the s-th row of the 16-block of its argument
        a = tl.sum(tl.where(cols == (rows // 16) * 16 + s, Ad, 0.0), 1)
        r = tl.sum(tl.where(rows == (cols // 16) * 16 + s, X, 0.0), 0)
        X -= tl.where(same16, a[:, None] * r[None, :], 0.0)
    if C > 16:
        X = _merge(X, A, rows, cols, 32, DOT_PREC)
    if C > 32:
        X = _merge(X, A, rows, cols, 64, DOT_PREC)
    return X


@triton.jit
def _solve_tril_kernel(a_ptr, x_ptr, C: tl.constexpr, DOT_PREC: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, C)[:, None] * C + tl.arange(0, C)[None, :]
    A = tl.load(a_ptr + i * C * C + offs).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + i * C * C + offs, solve_unit_lower(A, C, DOT_PREC))


def solve_tril(A: torch.Tensor) -> torch.Tensor:
    """(I + tril(A, -1))^-1 for A [..., C, C], C in (16, 32, 64); the diagonal and upper part of A are
    ignored. Result in the accumulation dtype (float32, float64 for float64 A). For testing the building block."""
    check_tensor("A", A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2] or A.shape[-1] not in (16, 32, 64):
        raise ValueError(f"A must be [..., C, C] with C in (16, 32, 64), got shape {tuple(A.shape)}")
    C = A.shape[-1]
    a = A.reshape(-1, C, C).contiguous()
    x = new_empty(a.shape, acc_dtype(A.dtype), A.device)
    if a.shape[0]:
        _solve_tril_kernel[(a.shape[0],)](a, x, C=C, DOT_PREC=dot_precision(A.dtype))
    return x.reshape(A.shape)
