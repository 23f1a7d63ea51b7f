"""WY representation of each DPLR chunk, forward and backward (IPLR: USE_GK=False).

Within a chunk with entering state h, the rows w_i = a_i^T S_{i-1} (what the low-rank term reads) satisfy
    W = A_ab W + A_ak V + Ahat h,   Ahat_i = a_i exp(G^-_i)   (A_ab, A_ak strictly lower, Ahat: from chunk_A)
so with X = (I - A_ab)^-1:   W = Wm h + U,   Wm = X Ahat  [C, K],   U = X A_ak V  [C, V].
Wm, U go to the state pass; X [NC, H, C, C] is kept for the backward (storage dtypes: dplr/chunk.py storage()).

Backward, given dWm and dU (= dW, from the state pass), with Gv = X^T dU and dAhat = X^T dWm:
    dA_ak = (Gv V^T) * Ms,   dV = dV_in + A_ak^T Gv,   dA_ab = (dAhat Wm^T + Gv U^T) * Ms,
    da = dAhat exp(G^-)     (Ms the strict lower mask; dG^- = a * da is formed in chunk_A's backward).
"""
import triton
import triton.language as tl

from ops.common.solve_tril import solve_unit_lower
from ops.common.utils import acc_dtype, block_size, dot_precision, launch_fitting, new_empty, operand_type
from ops.generalized_delta_rule.utils import masked_exp, mat_block, seq_block


@triton.jit
def wy_fwd_kernel(ah, v, Aak, Aab, x, wm, u, offsets, cmap,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """grid (NC, H): X = (I - A_ab)^-1 (in the accumulation dtype); Wm = X Ahat (Ahat = a exp(G^-) from chunk_A);
    U = X (A_ak V) (products on OP operands)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = Aab.dtype.element_ty
    base = (i_c * H + i_h).to(tl.int64) * C * C

    b_X = solve_unit_lower(-tl.load(mat_block(Aab + base, C, C, 0, 0, C, C)), C, DOT_PREC)
    tl.store(mat_block(x + base, C, C, 0, 0, C, C), b_X.to(x.dtype.element_ty))
    b_Aak = tl.load(mat_block(Aak + base, C, C, 0, 0, C, C)).to(OP)
    b_Xo = b_X.to(OP)

    for i_k in range(tl.cdiv(K, BK)):
        b_a = tl.load(seq_block(ah, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_wm = tl.dot(b_Xo, b_a, input_precision=DOT_PREC, out_dtype=ACC)
        tl.store(seq_block(wm, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), b_wm.to(wm.dtype.element_ty),
                 boundary_check=(0, 1))
    for i_v in range(tl.cdiv(V, BV)):
        b_v = tl.load(seq_block(v, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_av = tl.dot(b_Aak, b_v, input_precision=DOT_PREC, out_dtype=ACC).to(OP)
        b_u = tl.dot(b_Xo, b_av, input_precision=DOT_PREC, out_dtype=ACC)
        tl.store(seq_block(u, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), b_u.to(u.dtype.element_ty),
                 boundary_check=(0, 1))


@triton.jit
def wy_bwd_kernel(g, gk, v, Aak, x, wm, u, dwm, du, dv_in, dv, dAak, dAab, da, offsets, cmap,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr,
                  OP: tl.constexpr):
    """grid (NC, H): dv (final, v's dtype), dA_ak, dA_ab (masked) and da's WY part (accumulation dtype); products
    on OP operands."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    nv = tl.minimum(L - j * C, C)
    ACC = dAak.dtype.element_ty
    base = (i_c * H + i_h).to(tl.int64) * C * C

    b_Xt = tl.trans(tl.load(mat_block(x + base, C, C, 0, 0, C, C)).to(OP))
    b_Aak_t = tl.trans(tl.load(mat_block(Aak + base, C, C, 0, 0, C, C)).to(OP))
    b_dAak = tl.zeros([C, C], dtype=ACC)
    b_dAab = tl.zeros([C, C], dtype=ACC)
    for i_v in range(tl.cdiv(V, BV)):
        b_du = tl.load(seq_block(du, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_v = tl.load(seq_block(v, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_u = tl.load(seq_block(u, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_gv = tl.dot(b_Xt, b_du, input_precision=DOT_PREC, out_dtype=ACC).to(OP)
        b_dAak = tl.dot(b_gv, tl.trans(b_v), b_dAak, input_precision=DOT_PREC, out_dtype=ACC)
        b_dAab = tl.dot(b_gv, tl.trans(b_u), b_dAab, input_precision=DOT_PREC, out_dtype=ACC)
        b_dv = tl.load(seq_block(dv_in, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1))
        b_dv = tl.dot(b_Aak_t, b_gv, b_dv.to(ACC), input_precision=DOT_PREC, out_dtype=ACC)
        p_dv = seq_block(dv, bos, i_h, L, H, V, j * C, i_v * BV, C, BV)
        tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), boundary_check=(0, 1))
    vi = (tl.arange(0, C) < nv)[:, None]
    for i_k in range(tl.cdiv(K, BK)):
        b_dwm = tl.load(seq_block(dwm, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_wm = tl.load(seq_block(wm, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_dah = tl.dot(b_Xt, b_dwm, input_precision=DOT_PREC, out_dtype=ACC)
        b_dAab = tl.dot(b_dah.to(OP), tl.trans(b_wm), b_dAab, input_precision=DOT_PREC, out_dtype=ACC)
        if USE_GK:
            b_g = tl.load(seq_block(g, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1))
            b_g -= tl.load(seq_block(gk, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(ACC)
            b_dah *= masked_exp(b_g, vi)
        tl.store(seq_block(da, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), b_dah, boundary_check=(0, 1))
    strict = tl.arange(0, C)[:, None] > tl.arange(0, C)[None, :]
    tl.store(mat_block(dAak + base, C, C, 0, 0, C, C), tl.where(strict, b_dAak, 0.0))
    tl.store(mat_block(dAab + base, C, C, 0, 0, C, C), tl.where(strict, b_dAab, 0.0))


# Largest K / V tile (tests lower it to reach the multi-tile loops with small head sizes).
TILE = 64


def _blocks(K, V):
    return min(TILE, block_size(K)), min(TILE, block_size(V))


def operands(dtype, C, K, V):
    """(forward, backward) dot operand types (utils.operand_type)."""
    BK, BV = _blocks(K, V)
    return operand_type("dplr_wy_fwd", dtype, C, BK, BV), operand_type("dplr_wy_bwd", dtype, C, BK, BV)


def wy_fwd(ah, v, Aak, Aab, offsets, cmap, chunk_size, x_dtype=None, wm_dtype=None, u_dtype=None):
    """ah = a exp(G^-) (a for IPLR) [B, T, H, K]. Returns X [NC, H, C, C], Wm [B, T, H, K], U [B, T, H, V] in
    x_dtype, wm_dtype, u_dtype (the accumulation dtype by default)."""
    B, T, H, K = ah.shape
    V = v.shape[-1]
    C, NC, acc = chunk_size, cmap.shape[0], acc_dtype(v.dtype)
    x = new_empty((NC, H, C, C), x_dtype or acc, v.device)
    wm = new_empty((B, T, H, K), wm_dtype or acc, v.device)
    u = new_empty((B, T, H, V), u_dtype or acc, v.device)
    if NC:
        BK, BV = _blocks(K, V)
        launch_fitting(
            wy_fwd_kernel, (NC, H), ah, v, Aak, Aab, x, wm, u, offsets, cmap, H=H, K=K, V=V, C=C, BK=BK, BV=BV,
            DOT_PREC=dot_precision(v.dtype), OP=operands(v.dtype, C, K, V)[0])
    return x, wm, u


def wy_bwd(g, gk, v, Aak, x, wm, u, dwm, du, dv_in, offsets, cmap, chunk_size):
    """Returns dv (v's dtype), dA_ak, dA_ab [NC, H, C, C] and da's WY part [B, T, H, K] (accumulation dtype)."""
    B, T, H, V = v.shape
    K = wm.shape[-1]
    C, NC, acc = chunk_size, cmap.shape[0], acc_dtype(v.dtype)
    dv = new_empty(v.shape, v.dtype, v.device)
    dAak = new_empty((NC, H, C, C), acc, v.device)
    dAab = new_empty((NC, H, C, C), acc, v.device)
    da = new_empty((B, T, H, K), acc, v.device)
    if NC:
        BK, BV = _blocks(K, V)
        launch_fitting(
            wy_bwd_kernel, (NC, H), g, gk, v, Aak, x, wm, u, dwm, du, dv_in, dv, dAak, dAab, da, offsets, cmap, H=H,
            K=K, V=V, C=C, BK=BK, BV=BV, USE_GK=g is not None, DOT_PREC=dot_precision(v.dtype),
            OP=operands(v.dtype, C, K, V)[1])
    return dv, dAak, dAab, da
