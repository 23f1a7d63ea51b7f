"""Chunk-local cumulative log decay of the DPLR chunk form.

Per chunk (rows i = 0..C-1 of one sequence's chunk, one head):  G_i = sum_{s <= i} gk_s  (inclusive, per key
channel), in the accumulation dtype. Every later stage forms decays from differences of G inside one chunk."""
import triton
import triton.language as tl

from ops.common.utils import acc_dtype, block_size, new_empty
from ops.generalized_delta_rule.utils import seq_block


@triton.jit
def chunk_cumsum_kernel(gk, g, offsets, cmap, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr):
    """grid (NC, H): g[chunk rows] = cumsum(gk[chunk rows], axis 0)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = g.dtype.element_ty
    for i_k in range(tl.cdiv(K, BK)):
        b_g = tl.load(seq_block(gk, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(ACC)
        tl.store(seq_block(g, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), tl.cumsum(b_g, 0), boundary_check=(0, 1))


def chunk_cumsum(gk, offsets, cmap, chunk_size, dtype):
    """gk [B, T, H, K] -> G [B, T, H, K] in the accumulation dtype of `dtype` (the input dtype)."""
    B, T, H, K = gk.shape
    g = new_empty(gk.shape, acc_dtype(dtype), gk.device)
    NC = cmap.shape[0]
    if NC:
        chunk_cumsum_kernel[(NC, H)](gk, g, offsets, cmap, H=H, K=K, C=chunk_size, BK=min(64, block_size(K)))
    return g
