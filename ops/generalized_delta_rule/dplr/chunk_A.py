"""Intra-chunk matrices of the DPLR chunk form, forward and backward (IPLR: USE_GK=False, no decay).

Per chunk (rows i, j = 0..C-1) and head, with G the chunk-local cumulative log decay (G_i inclusive of gk_i)
and G^-_i = G_i - gk_i:
    A_qk[i, j] = sum_k q_ik k_jk exp(G_ik - G_jk),     A_qb likewise with b_j      (i >= j)
    A_ak[i, j] = sum_k a_ik k_jk exp(G^-_ik - G_jk),   A_ab likewise with b_j      (i >  j)
(IPLR: the exps are 1.) Stored [NC, H, C, C] in the accumulation dtype.

Decays stay finite for any gk <= 0 (any magnitude; gk >= -20 per step is what the tests draw; positive gk is
supported only while the products of exp(gk) stay finite): no exp of a positive number is formed. The chunk is
split into 16-row blocks. Within a diagonal block the pair terms exp(G_i - G_j) are formed one token j at a
time over [16, BK] tiles, masked (i >= j) before the exp. An off-diagonal block (I > J) is factored around the
row r that ends block I - 1 (J's rows <= r < I's rows):  exp(G_i - G_j) = exp(G_i - G_r) exp(G_r - G_j), both
<= 1 (also exp(G^-_i - G_r), since i - 1 >= r), so a block row is one tl.dot of rescaled [16, BK] x [BK, C]
tiles.

Backward (one program per K block, as every term is separable in k, and per 16-row block I): given dA_qk,
dA_qb, dA_ak, dA_ab (masked) and the gradients the other stages already have for q, k, a, b (dq_in, dk_in, da_in,
db_in) and for the chunk's total decay gamma = G_last (dgam),
    dq_i = dq_in + sum_j dA_qk[i,j] k_j e(G_i-G_j) + dA_qb[i,j] b_j e(G_i-G_j)
    da_i = da_in + sum_j dA_ak[i,j] k_j e(G^-_i-G_j) + dA_ab[i,j] b_j e(G^-_i-G_j)
    dk_j = dk_in + sum_i dA_qk[i,j] q_i e(G_i-G_j) + dA_ak[i,j] a_i e(G^-_i-G_j)
    db_j = db_in + sum_i dA_qb[i,j] q_i e(G_i-G_j) + dA_ab[i,j] a_i e(G^-_i-G_j)
(block I's row sums factored around the row ending block I - 1, its column sums around its own last valid
row). Every decay of the chunk form is exp(G_hi - G_lo) for a range (lo, hi] of tokens, and its gradient adds to
dgk on exactly that range, so (with the exponents written as G or G^- = G shifted by one)
    dG = q*dq - k*dk - b*db,  dG^- = a*da,  dgk_s = sum_{i >= s} dG_i + sum_{i > s} dG^-_i + dgam
(a reverse cumsum within each block; chunk_A_dgk_kernel adds each block's carry, the sums of the chunk's later
blocks). Terms whose range is empty have a decay of exactly 1 and O(1) size, and their contributions cancel in
exact arithmetic; formed in floating point they would leave an O(u) error in a dgk that strong decay makes
O(exp(gk)). They are kept out of dG and dG^-
(still in dq, dk, da, db): the diagonal of A_qk, A_qb (i = j), the first subdiagonal of A_ak, A_ab (j = i - 1,
handled as a band with decay 1), a exp(G^-) on the chunk's first row and the last row's b, k terms of the state
pass (left out of dgam too, in chunk_o.py).
"""

import os

import triton
import triton.language as tl

from ops.common.utils import acc_dtype, block_size, dot_precision, launch_fitting, new_empty
from ops.generalized_delta_rule.utils import masked_exp, seq_block, seq_row

BC = 16  # rows per diagonal block


@triton.jit
def _diag_fwd_tokens(k, b, g, b_q, b_a, g_I, gm_I, bos, i_h, t0, r0, nv, vi, d_qk, d_qb, d_ak, d_ab,
                     H: tl.constexpr, K: tl.constexpr, c0, BC: tl.constexpr, BK: tl.constexpr,
                     UNROLL: tl.constexpr):
    """The forward's diagonal block one token jj at a time over [BC, BK] tiles: column jj of each matrix (UNROLL
    tokens per loop step, so their loads can be issued together)."""
    ri = tl.arange(0, BC)[:, None]
    for j0 in range(0, BC, UNROLL):
        for u in tl.static_range(UNROLL):
            jj = j0 + u
            t_j = tl.minimum(r0 + jj, nv - 1)  # a valid row; a column past the sequence end has no valid i >= jj
            k_j = seq_row(k, bos, i_h, t0 + t_j, H, K, c0, BK).to(b_q.dtype)[None, :]
            b_j = seq_row(b, bos, i_h, t0 + t_j, H, K, c0, BK).to(b_q.dtype)[None, :]
            g_j = seq_row(g, bos, i_h, t0 + t_j, H, K, c0, BK)[None, :]
            e1 = masked_exp(g_I - g_j, (ri >= jj) & vi)
            e2 = masked_exp(gm_I - g_j, (ri > jj) & vi)
            sel = (tl.arange(0, BC) == jj)[None, :]
            d_qk += tl.where(sel, tl.sum(b_q * k_j * e1, 1)[:, None], 0.0)
            d_qb += tl.where(sel, tl.sum(b_q * b_j * e1, 1)[:, None], 0.0)
            d_ak += tl.where(sel, tl.sum(b_a * k_j * e2, 1)[:, None], 0.0)
            d_ab += tl.where(sel, tl.sum(b_a * b_j * e2, 1)[:, None], 0.0)
    return d_qk, d_qb, d_ak, d_ab


@triton.jit
def _diag_bwd_tokens(q, k, a, b, g, gk, dAqk, dAqb, dAak, dAab, g_I, gm_I, bos, i_h, t0, r0, rows, nv, vi, base,
                     b_dq, b_da, b_dk, b_db, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, c0,
                     BC: tl.constexpr, BK: tl.constexpr, UNROLL: tl.constexpr):
    """The backward's diagonal block, strictly lower pairs (the subdiagonal of dA_ak, dA_ab excluded), one token
    tt at a time over [BC, BK] tiles: as the column j of dq_i, da_i (rows i > tt) and as the row i of dk_j, db_j
    (j < tt) (UNROLL tokens per loop step)."""
    rb = tl.arange(0, BC)[:, None]
    for t_0 in range(0, BC, UNROLL):
        for u in tl.static_range(UNROLL):
            tt = t_0 + u
            t_t = tl.minimum(r0 + tt, nv - 1)  # a valid row; a token past the sequence end adds nothing
            m_t = r0 + tt < nv
            k_t = seq_row(k, bos, i_h, t0 + t_t, H, K, c0, BK).to(g_I.dtype)[None, :]
            b_t = seq_row(b, bos, i_h, t0 + t_t, H, K, c0, BK).to(g_I.dtype)[None, :]
            q_t = seq_row(q, bos, i_h, t0 + t_t, H, K, c0, BK).to(g_I.dtype)[None, :]
            a_t = seq_row(a, bos, i_h, t0 + t_t, H, K, c0, BK).to(g_I.dtype)[None, :]
            g_t = seq_row(g, bos, i_h, t0 + t_t, H, K, c0, BK)[None, :]
            gm_t = g_t - seq_row(gk, bos, i_h, t0 + t_t, H, K, c0, BK).to(g_I.dtype)[None, :]
            p_c = base + rows * C + r0 + tt  # column tt of the block: dA[i, tt]
            p_r = base + (r0 + tt) * C + rows  # row tt of the block: dA[tt, j]
            m_c = (rb > tt) & vi  # a valid row i > tt makes tt valid
            e1 = masked_exp(g_I - g_t, m_c)
            e2 = masked_exp(gm_I - g_t, m_c)
            c_ak = tl.where(rows - 1 == r0 + tt, 0.0, tl.load(dAak + p_c))[:, None]
            c_ab = tl.where(rows - 1 == r0 + tt, 0.0, tl.load(dAab + p_c))[:, None]
            b_dq += (tl.load(dAqk + p_c)[:, None] * k_t + tl.load(dAqb + p_c)[:, None] * b_t) * e1
            b_da += (c_ak * k_t + c_ab * b_t) * e2
            m_r = (rb < tt) & m_t
            e1 = masked_exp(g_t - g_I, m_r)
            e2 = masked_exp(gm_t - g_I, m_r)
            r_ak = tl.where(rows + 1 == r0 + tt, 0.0, tl.load(dAak + p_r))[:, None]
            r_ab = tl.where(rows + 1 == r0 + tt, 0.0, tl.load(dAab + p_r))[:, None]
            b_dk += tl.load(dAqk + p_r)[:, None] * e1 * q_t + r_ak * e2 * a_t
            b_db += tl.load(dAqb + p_r)[:, None] * e1 * q_t + r_ab * e2 * a_t
    return b_dq, b_da, b_dk, b_db


@triton.jit
def _store(ptr, val, bos, i_h, L, H: tl.constexpr, K: tl.constexpr, r0, c0, BR: tl.constexpr, BK: tl.constexpr):
    p = seq_block(ptr, bos, i_h, L, H, K, r0, c0, BR, BK)
    tl.store(p, val.to(p.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def _rows(ptr, bos, i_h, r, m_r, H: tl.constexpr, K: tl.constexpr, c0, BK: tl.constexpr):
    """Rows r ([BR] sequence-relative indices, loaded where m_r) and columns c0.. of a [B*T, H, K] tensor."""
    o = c0 + tl.arange(0, BK)
    return tl.load(ptr + ((bos + r[:, None]) * H + i_h) * K + o[None, :], mask=m_r[:, None] & (o < K)[None, :],
                   other=0)


@triton.jit
def _store_causal(Aqk, Aqb, Aak, Aab, o_s, rows, cols, b_qk, b_qb, b_ak, b_ab):
    """Block row of the four matrices with the causal masks: i >= j for A_qk, A_qb, i > j for A_ak, A_ab."""
    incl = rows[:, None] >= cols[None, :]
    strict = rows[:, None] > cols[None, :]
    tl.store(Aqk + o_s, tl.where(incl, b_qk, 0.0).to(Aqk.dtype.element_ty))
    tl.store(Aqb + o_s, tl.where(incl, b_qb, 0.0).to(Aqb.dtype.element_ty))
    tl.store(Aak + o_s, tl.where(strict, b_ak, 0.0).to(Aak.dtype.element_ty))
    tl.store(Aab + o_s, tl.where(strict, b_ab, 0.0).to(Aab.dtype.element_ty))


@triton.jit
def _deviation(g_I, gm_I, g_ref, vi, vm):
    """|G_ik - G_ref,k| on the rows vi and |G^-_ik - G_ref,k| on the rows vm, elementwise ([BC, BK]; 0 elsewhere)."""
    return tl.maximum(tl.where(vi, tl.abs(g_I - g_ref), 0.0), tl.where(vm, tl.abs(gm_I - g_ref), 0.0))


@triton.jit
def _spread(g, gk, bos, i_h, L, t0, r0, r, nv, H: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
            BK: tl.constexpr):
    """max |G_ik - G_rk| and |G^-_ik - G_rk| over block I's valid rows i (> r for G^-) and all K channels."""
    rows = r0 + tl.arange(0, BC)
    vi = (rows < nv)[:, None]
    m = tl.zeros([BC, BK], dtype=g.dtype.element_ty)
    for i_k in range(tl.cdiv(K, BK)):
        c0 = i_k * BK
        g_I = tl.load(seq_block(g, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
        gm_I = g_I - tl.load(seq_block(gk, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(m.dtype)
        g_r = seq_row(g, bos, i_h, t0 + r, H, K, c0, BK)[None, :]
        m = tl.maximum(m, _deviation(g_I, gm_I, g_r, vi, vi & (rows > r)[:, None]))
    return tl.max(tl.max(m, 1), 0)


@triton.jit
def chunk_A_fwd_kernel(q, k, a, b, g, gk, Aqk, Aqb, Aak, Aab, qh, ah, kt, bt, offsets, cmap,
                       H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                       USE_GK: tl.constexpr, DOT_PREC: tl.constexpr, UNROLL: tl.constexpr,
                       DIAG_MAX: tl.constexpr):
    """grid (C // BC, NC, H): block row I of the four matrices, [BC, C] each; with decay also rows I of
    q exp(G), a exp(G^-), k exp(gamma - G) and b exp(gamma - G) (dot operands of chunk_o_fwd and chunk_h_bwd, wy_fwd,
    and of the state passes; in qh's, ah's, kt's and bt's dtypes), gamma = G of the chunk's last row."""
    i_b, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    nv = tl.minimum(L - j * C, C)  # valid rows of this chunk
    ACC = Aab.dtype.element_ty
    t0 = j * C
    r0 = i_b * BC
    rows = r0 + tl.arange(0, BC)
    cols = tl.arange(0, C)
    r = tl.minimum(tl.maximum(r0 - 1, 0), nv - 1)  # reference row of the off-diagonal blocks
    # columns j < lim take part in the products: the off-diagonal blocks (j <= r), and with DIAG the diagonal block
    # too, where every log decay of this block row lies within DIAG_MAX of row r's (all K channels): its column
    # factors exp(G_r - G_j) are then at most exp(DIAG_MAX) and the row factors at least exp(-DIAG_MAX)
    DIAG = False
    lim = tl.minimum(r + 1, r0)
    if USE_GK:
        if DIAG_MAX >= 0:
            DIAG = _spread(g, gk, bos, i_h, L, t0, r0, r, nv, H, K, BC, BK) <= DIAG_MAX
            lim = tl.where(DIAG, tl.minimum(r0 + BC, nv), lim)

    b_qk = tl.zeros([BC, C], dtype=ACC)
    b_qb = tl.zeros([BC, C], dtype=ACC)
    b_ak = tl.zeros([BC, C], dtype=ACC)
    b_ab = tl.zeros([BC, C], dtype=ACC)
    d_qk = tl.zeros([BC, BC], dtype=ACC)
    d_qb = tl.zeros([BC, BC], dtype=ACC)
    d_ak = tl.zeros([BC, BC], dtype=ACC)
    d_ab = tl.zeros([BC, BC], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        c0 = i_k * BK
        b_q = tl.load(seq_block(q, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
        b_a = tl.load(seq_block(a, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
        b_k = tl.load(seq_block(k, bos, i_h, L, H, K, t0, c0, C, BK), boundary_check=(0, 1)).to(ACC)
        b_b = tl.load(seq_block(b, bos, i_h, L, H, K, t0, c0, C, BK), boundary_check=(0, 1)).to(ACC)
        if USE_GK:
            g_all = tl.load(seq_block(g, bos, i_h, L, H, K, t0, c0, C, BK), boundary_check=(0, 1))
            g_I = tl.load(seq_block(g, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
            gm_I = g_I - tl.load(seq_block(gk, bos, i_h, L, H, K, t0 + r0, c0, BC, BK),
                                 boundary_check=(0, 1)).to(ACC)
            g_r = seq_row(g, bos, i_h, t0 + r, H, K, c0, BK)[None, :]
            vi = (rows < nv)[:, None]
            _store(qh, b_q * masked_exp(g_I, vi), bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
            _store(ah, b_a * masked_exp(gm_I, vi), bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
            f_I = masked_exp(seq_row(g, bos, i_h, t0 + nv - 1, H, K, c0, BK)[None, :] - g_I, vi)
            b_kI = tl.load(seq_block(k, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
            _store(kt, b_kI * f_I, bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
            b_bI = tl.load(seq_block(b, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
            _store(bt, b_bI * f_I, bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
            # off-diagonal blocks: rows rescaled by exp(G_i - G_r), columns j <= r by exp(G_r - G_j)
            mj = (cols < lim)[:, None]
            f_j = masked_exp(g_r - g_all, mj)
            b_qt = b_q * masked_exp(g_I - g_r, vi)
            b_at = b_a * masked_exp(gm_I - g_r, vi & (rows > r)[:, None])  # (row r = 0 of block 0: -gk_0 > 0)
            b_kt = b_k * f_j
            b_bt = b_b * f_j
            b_qk += tl.dot(b_qt, tl.trans(b_kt), input_precision=DOT_PREC)
            b_qb += tl.dot(b_qt, tl.trans(b_bt), input_precision=DOT_PREC)
            b_ak += tl.dot(b_at, tl.trans(b_kt), input_precision=DOT_PREC)
            b_ab += tl.dot(b_at, tl.trans(b_bt), input_precision=DOT_PREC)
            if not DIAG:  # the diagonal block, one column jj at a time: A[i, jj] = sum_k x_ik y_jj,k exp(G_ik - G_jj,k)
                d_qk, d_qb, d_ak, d_ab = _diag_fwd_tokens(k, b, g, b_q, b_a, g_I, gm_I, bos, i_h, t0, r0, nv, vi,
                                                          d_qk, d_qb, d_ak, d_ab, H, K, c0, BC, BK, UNROLL)
        else:
            b_qk += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
            b_qb += tl.dot(b_q, tl.trans(b_b), input_precision=DOT_PREC)
            b_ak += tl.dot(b_a, tl.trans(b_k), input_precision=DOT_PREC)
            b_ab += tl.dot(b_a, tl.trans(b_b), input_precision=DOT_PREC)

    base = (i_c * H + i_h).to(tl.int64) * C * C
    o_s = base + rows[:, None] * C + cols[None, :]
    if USE_GK:
        if DIAG:
            _store_causal(Aqk, Aqb, Aak, Aab, o_s, rows, cols, b_qk, b_qb, b_ak, b_ab)
        else:
            # the strip outside the diagonal block (zero right of it), then the diagonal block: disjoint stores
            m_s = ((cols < r0) | (cols >= r0 + BC))[None, :]
            tl.store(Aqk + o_s, b_qk.to(Aqk.dtype.element_ty), mask=m_s)
            tl.store(Aqb + o_s, b_qb.to(Aqb.dtype.element_ty), mask=m_s)
            tl.store(Aak + o_s, b_ak.to(Aak.dtype.element_ty), mask=m_s)
            tl.store(Aab + o_s, b_ab, mask=m_s)
            o_d = base + rows[:, None] * C + (r0 + tl.arange(0, BC))[None, :]
            tl.store(Aqk + o_d, d_qk.to(Aqk.dtype.element_ty))
            tl.store(Aqb + o_d, d_qb.to(Aqb.dtype.element_ty))
            tl.store(Aak + o_d, d_ak.to(Aak.dtype.element_ty))
            tl.store(Aab + o_d, d_ab)
    else:
        _store_causal(Aqk, Aqb, Aak, Aab, o_s, rows, cols, b_qk, b_qb, b_ak, b_ab)


@triton.jit
def chunk_A_bwd_kernel(q, k, a, b, g, gk, dAqk, dAqb, dAak, dAab, dq_in, dk_in, da_in, db_in, dgam,
                       dq, dk, da, db, dg_loc, dg_sum, offsets, cmap,
                       H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                       USE_GK: tl.constexpr, DOT_PREC: tl.constexpr, UNROLL: tl.constexpr,
                       DIAG_MAX: tl.constexpr):
    """grid (K blocks, NC * C // BC, H): the gradients of q, k, a, b for one [BC, BK] tile (block I of a chunk), the
    other blocks' terms summed one [BC, BC] x [BC, BK] product at a time. dgk is left in two parts, finished
    by chunk_A_dgk_kernel: dg_loc (this block's reverse cumsum + dgam, accumulation dtype, shaped like gk) and
    dg_sum [NC, H, NB, K] (the block's column sum of dG + dG^-, carried into every earlier block)."""
    i_k, i_cb, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NB: tl.constexpr = C // BC
    i_c, I = i_cb // NB, i_cb % NB
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    nv = tl.minimum(L - j * C, C)
    ACC = dq_in.dtype.element_ty
    t0 = j * C
    c0 = i_k * BK
    r0 = I * BC
    ar = tl.arange(0, BC)
    rows = r0 + ar
    base = (i_c * H + i_h).to(tl.int64) * C * C
    b_qI = tl.load(seq_block(q, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
    b_kI = tl.load(seq_block(k, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
    b_aI = tl.load(seq_block(a, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
    b_bI = tl.load(seq_block(b, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
    b_dq = tl.zeros([BC, BK], dtype=ACC)
    b_da = tl.zeros([BC, BK], dtype=ACC)
    b_dk = tl.zeros([BC, BK], dtype=ACC)
    b_db = tl.zeros([BC, BK], dtype=ACC)
    if USE_GK:
        g_I = tl.load(seq_block(g, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
        gm_I = g_I - tl.load(seq_block(gk, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
        vi = (rows < nv)[:, None]
        # row sums over earlier blocks J, factored around r (the row ending block I - 1); the first subdiagonal
        # of dA_ak, dA_ab (in block J = I - 1) is left to the band below
        r = tl.minimum(tl.maximum(r0 - 1, 0), nv - 1)
        g_r = seq_row(g, bos, i_h, t0 + r, H, K, c0, BK)[None, :]
        # column sums factored around r2 (the last valid row of block I)
        r2 = tl.minimum(r0 + BC - 1, nv - 1)
        g_r2 = seq_row(g, bos, i_h, t0 + r2, H, K, c0, BK)[None, :]
        # DIAG: the diagonal block's strictly lower pairs summed by the same products (J = I in both loops), where
        # this tile's log decays in it lie within DIAG_MAX of rows r and r2 (factors within exp(+-DIAG_MAX));
        # else token by token below
        DIAG = False
        j_hi = I
        j_lo = I
        if DIAG_MAX >= 0:
            m = tl.maximum(_deviation(g_I, gm_I, g_r, vi, vi & (rows > r)[:, None]),
                           _deviation(g_I, gm_I, g_r2, vi, vi & (rows > r0)[:, None]))
            DIAG = tl.max(tl.max(m, 1), 0) <= DIAG_MAX
            j_hi = tl.where(DIAG, I + 1, I)
            j_lo = tl.where(DIAG, I - 1, I)
        for J in range(NB):  # a loop over a program-dependent range does not run in the interpreter
            if J < j_hi:
                cj = J * BC + ar
                p_d = base + rows[:, None] * C + cj[None, :]
                band = rows[:, None] - 1 == cj[None, :]
                low = rows[:, None] > cj[None, :]  # (every pair of an earlier block)
                d_qk = tl.where(low, tl.load(dAqk + p_d), 0.0)
                d_qb = tl.where(low, tl.load(dAqb + p_d), 0.0)
                d_ak = tl.where(band | ~low, 0.0, tl.load(dAak + p_d))
                d_ab = tl.where(band | ~low, 0.0, tl.load(dAab + p_d))
                f_j = masked_exp(g_r - tl.load(seq_block(g, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK),
                                               boundary_check=(0, 1)), (cj < nv)[:, None])
                b_kt = f_j * tl.load(seq_block(k, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK),
                                     boundary_check=(0, 1)).to(ACC)
                b_bt = f_j * tl.load(seq_block(b, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK),
                                     boundary_check=(0, 1)).to(ACC)
                b_dq += tl.dot(d_qk, b_kt, input_precision=DOT_PREC) + tl.dot(d_qb, b_bt, input_precision=DOT_PREC)
                b_da += tl.dot(d_ak, b_kt, input_precision=DOT_PREC) + tl.dot(d_ab, b_bt, input_precision=DOT_PREC)
        b_dq *= masked_exp(g_I - g_r, vi)
        b_da *= masked_exp(gm_I - g_r, vi & (rows > r)[:, None])  # (row r = 0 of block 0 has no earlier column)
        # column sums over later blocks J (and with DIAG block I), factored around r2
        for J in range(NB):  # a loop over a program-dependent range does not run in the interpreter
            if J > j_lo:
                cj = J * BC + ar
                p_d = base + cj[None, :] * C + rows[:, None]  # [i, c] = dA[J's row c, I's row i]
                band = cj[None, :] - 1 == rows[:, None]
                low = cj[None, :] > rows[:, None]  # (every pair of a later block)
                d_qk = tl.where(low, tl.load(dAqk + p_d), 0.0)
                d_qb = tl.where(low, tl.load(dAqb + p_d), 0.0)
                d_ak = tl.where(band | ~low, 0.0, tl.load(dAak + p_d))
                d_ab = tl.where(band | ~low, 0.0, tl.load(dAab + p_d))
                g_J = tl.load(seq_block(g, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK), boundary_check=(0, 1))
                gm_J = g_J - tl.load(seq_block(gk, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK),
                                     boundary_check=(0, 1)).to(ACC)
                mi = (cj < nv)[:, None]
                b_qt = tl.load(seq_block(q, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK),
                               boundary_check=(0, 1)).to(ACC) * masked_exp(g_J - g_r2, mi)
                b_at = tl.load(seq_block(a, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK),
                               boundary_check=(0, 1)).to(ACC) * masked_exp(gm_J - g_r2, mi & (cj > r0)[:, None])
                b_dk += tl.dot(d_qk, b_qt, input_precision=DOT_PREC) + tl.dot(d_ak, b_at, input_precision=DOT_PREC)
                b_db += tl.dot(d_qb, b_qt, input_precision=DOT_PREC) + tl.dot(d_ab, b_at, input_precision=DOT_PREC)
        f_I = masked_exp(g_r2 - g_I, vi)
        b_dk *= f_I
        b_db *= f_I
        # the diagonal block: strictly lower pairs (subdiagonal of dA_ak, dA_ab excluded), token by token ...
        if not DIAG:
            b_dq, b_da, b_dk, b_db = _diag_bwd_tokens(q, k, a, b, g, gk, dAqk, dAqb, dAak, dAab, g_I, gm_I, bos,
                                                      i_h, t0, r0, rows, nv, vi, base, b_dq, b_da, b_dk, b_db, H, K,
                                                      C, c0, BC, BK, UNROLL)
        # ... plus the terms with decay exactly 1, kept out of dG: the diagonal of dA_qk, dA_qb ...
        s_qk = tl.load(dAqk + base + rows * C + rows)[:, None]
        s_qb = tl.load(dAqb + base + rows * C + rows)[:, None]
        b_dq_1 = s_qk * b_kI + s_qb * b_bI
        b_dk_1 = s_qk * b_qI
        b_db_1 = s_qb * b_qI
        # ... and the band j = i - 1 of dA_ak, dA_ab (rows i of this block with i - 1, and j with j + 1)
        m_p = (rows >= 1) & (rows < nv)
        s_ak = tl.load(dAak + base + rows * C + rows - 1, mask=m_p, other=0)[:, None]
        s_ab = tl.load(dAab + base + rows * C + rows - 1, mask=m_p, other=0)[:, None]
        b_kp = _rows(k, bos, i_h, t0 + rows - 1, m_p, H, K, c0, BK).to(ACC)
        b_bp = _rows(b, bos, i_h, t0 + rows - 1, m_p, H, K, c0, BK).to(ACC)
        b_da_1 = tl.where(m_p[:, None], s_ak * b_kp + s_ab * b_bp, 0.0)
        m_n = rows + 1 < nv
        s_ak = tl.load(dAak + base + (rows + 1) * C + rows, mask=m_n, other=0)[:, None]
        s_ab = tl.load(dAab + base + (rows + 1) * C + rows, mask=m_n, other=0)[:, None]
        b_an = _rows(a, bos, i_h, t0 + rows + 1, m_n, H, K, c0, BK).to(ACC)
        b_dk_1 += tl.where(m_n[:, None], s_ak * b_an, 0.0)
        b_db_1 += tl.where(m_n[:, None], s_ab * b_an, 0.0)
    else:
        # no decay: the masked dA as they are, blocks J <= I for the rows and J >= I for the columns
        for J in range(NB):  # a loop over a program-dependent range does not run in the interpreter
            if J <= I:
                cj = J * BC + ar
                p_d = base + rows[:, None] * C + cj[None, :]
                b_kJ = tl.load(seq_block(k, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
                b_bJ = tl.load(seq_block(b, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
                b_dq += tl.dot(tl.load(dAqk + p_d), b_kJ, input_precision=DOT_PREC)
                b_dq += tl.dot(tl.load(dAqb + p_d), b_bJ, input_precision=DOT_PREC)
                b_da += tl.dot(tl.load(dAak + p_d), b_kJ, input_precision=DOT_PREC)
                b_da += tl.dot(tl.load(dAab + p_d), b_bJ, input_precision=DOT_PREC)
        for J in range(NB):  # a loop over a program-dependent range does not run in the interpreter
            if J >= I:
                cj = J * BC + ar
                p_d = base + cj[None, :] * C + rows[:, None]
                b_qJ = tl.load(seq_block(q, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
                b_aJ = tl.load(seq_block(a, bos, i_h, L, H, K, t0 + J * BC, c0, BC, BK), boundary_check=(0, 1)).to(ACC)
                b_dk += tl.dot(tl.load(dAqk + p_d), b_qJ, input_precision=DOT_PREC)
                b_dk += tl.dot(tl.load(dAak + p_d), b_aJ, input_precision=DOT_PREC)
                b_db += tl.dot(tl.load(dAqb + p_d), b_qJ, input_precision=DOT_PREC)
                b_db += tl.dot(tl.load(dAab + p_d), b_aJ, input_precision=DOT_PREC)

    b_dq += tl.load(seq_block(dq_in, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
    b_da += tl.load(seq_block(da_in, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
    b_dk_s = tl.load(seq_block(dk_in, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
    b_db_s = tl.load(seq_block(db_in, bos, i_h, L, H, K, t0 + r0, c0, BC, BK), boundary_check=(0, 1))
    if USE_GK:
        # the state pass's b, k terms of the last row have decay exactly 1 (kept out of dG); G^-_0 = 0 depends on
        # no gk; the carry from the chunk's later blocks is added by chunk_A_dgk_kernel
        last = (rows == nv - 1)[:, None]
        b_dk += tl.where(last, 0.0, b_dk_s)
        b_db += tl.where(last, 0.0, b_db_s)
        b_dgm = tl.where((rows == 0)[:, None], 0.0, b_aI * b_da)
        b_x = b_qI * b_dq - b_kI * b_dk - b_bI * b_db + b_dgm
        o_k = c0 + tl.arange(0, BK)
        b_dgam = tl.load(dgam + (i_c * H + i_h).to(tl.int64) * K + o_k, mask=o_k < K, other=0)
        _store(dg_loc, tl.cumsum(b_x, 0, reverse=True) - b_dgm + b_dgam[None, :], bos, i_h, L, H, K, t0 + r0, c0,
               BC, BK)
        tl.store(dg_sum + ((i_c * H + i_h).to(tl.int64) * NB + I) * K + o_k, tl.sum(b_x, 0), mask=o_k < K)
        b_dq += b_dq_1
        b_da += b_da_1
        b_dk += b_dk_1 + tl.where(last, b_dk_s, 0.0)
        b_db += b_db_1 + tl.where(last, b_db_s, 0.0)
    else:
        b_dk += b_dk_s
        b_db += b_db_s
    _store(dq, b_dq, bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
    _store(dk, b_dk, bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
    _store(da, b_da, bos, i_h, L, H, K, t0 + r0, c0, BC, BK)
    _store(db, b_db, bos, i_h, L, H, K, t0 + r0, c0, BC, BK)


@triton.jit
def chunk_A_dgk_kernel(dg_loc, dg_sum, dgk, offsets, cmap, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
                       BC: tl.constexpr, BK: tl.constexpr):
    """grid (K blocks, NC, H): dgk of block I = dg_loc + the sum of dg_sum over the chunk's later blocks."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NB: tl.constexpr = C // BC
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    t0 = j * C
    o_k = i_k * BK + tl.arange(0, BK)
    p_s = dg_sum + (i_c * H + i_h).to(tl.int64) * NB * K + o_k
    b_carry = tl.zeros([BK], dtype=dg_sum.dtype.element_ty)
    for s in range(NB):
        I = NB - 1 - s
        p = seq_block(dg_loc, bos, i_h, L, H, K, t0 + I * BC, i_k * BK, BC, BK)
        _store(dgk, tl.load(p, boundary_check=(0, 1)) + b_carry[None, :], bos, i_h, L, H, K, t0 + I * BC, i_k * BK,
               BC, BK)
        b_carry += tl.load(p_s + I * K, mask=o_k < K, other=0)


# Largest K tile (tests lower it to reach the K loops with small head sizes); the forward's decay variant takes 8
# warps, the backward 4. ptxas (sm_90, bf16, K = V = 128, C = 64; python3 -m properties.hopper_fit --ops dplr_chunk
# --registers): the forward (diagonal blocks one token at a time over [16, BK] tiles) 114 registers, the backward
# (one program per 16-row block) 122 registers, no spills, at BK = 32. H200 at the point: chunk_A backward
# 15.9 ms over whole chunks -> 6.7 ms + 0.15 ms (dgk carry) per block (NOTES, GPU visit 8).
TILE = 32
BWD_WARPS = 4
# The forward's K tile, apart so the tune can set it alone (benchmarks.tune_launch --forms dplr.chunk --tiles):
# a wider tile runs the diagonal blocks' token loop over fewer, wider K steps (K / BK loops of 16 tokens each).
FWD_TILE = 32
# Tokens per step of the diagonal blocks' token loops (a divisor of BC): the loops are chains of 16 dependent steps,
# each waiting on its row loads; unrolled, a step's loads can be issued together (ptxas, bf16, K = V = 128, at 4:
# forward 111 registers, backward 168, no spills). H100 at the point (NOTES, GPU visit 16): the forward 3.88 ->
# 3.48 ms at 4, the backward 6.61 -> 8.40 ms, so the forward takes 4 and the backward 1.
FWD_UNROLL = 4
BWD_UNROLL = 1
# The diagonal blocks formed by the off-diagonal blocks' products (forward: per block row; backward: per [BC, BK]
# tile) where the block's log decays lie within DIAG_MAX of the reference rows' (the factors stay within
# exp(+-DIAG_MAX): finite, and their products far from float32's underflow); -1: always token by token.
# DIAG_MAX = 30 by default; DELTACHECK_DPLR_DIAG_DOT=0 keeps the token loops everywhere. H100 at the point (NOTES,
# GPU visit 17, with the other DPLR switches): chunk_A_fwd 3.58 -> 1.37 ms, chunk_A_bwd 6.65 -> 3.85. ptxas (sm_90,
# bf16, K = V = 128): forward 114 -> 128 registers (8 warps), backward 126 (4 warps), no spills.
DIAG_MAX = 30.0 if os.environ.get("DELTACHECK_DPLR_DIAG_DOT", "1") == "1" else -1.0


def _warps(gk):
    return 8 if gk is not None else 4


def chunk_A_fwd(q, k, a, b, g, gk, offsets, cmap, chunk_size, aq_dtype=None, aak_dtype=None, qh_dtype=None,
                ah_dtype=None, kbt_dtype=None):
    """A_qk, A_qb (in aq_dtype), A_ak (in aak_dtype), A_ab [NC, H, C, C] (the accumulation dtype, also the
    others' default), then q exp(G), a exp(G^-) (in qh_dtype, ah_dtype), k exp(gamma - G) and b exp(gamma - G) (in
    kbt_dtype) [B, T, H, K]: q, a, k, b themselves for IPLR. g: chunk-local cumsum, None for IPLR."""
    B, T, H, K = q.shape
    C, NC = chunk_size, cmap.shape[0]
    acc = acc_dtype(q.dtype)
    mats = tuple(new_empty((NC, H, C, C), dt or acc, q.device) for dt in (aq_dtype, aq_dtype, aak_dtype, acc))
    scaled = (q, a, k, b) if g is None else tuple(new_empty(q.shape, dt or acc, q.device)
                                                  for dt in (qh_dtype, ah_dtype, kbt_dtype, kbt_dtype))
    if NC:
        launch_fitting(
            chunk_A_fwd_kernel, (C // BC, NC, H), q, k, a, b, g, gk, *mats, *scaled, offsets, cmap, H=H, K=K, C=C,
            BC=BC, BK=min(FWD_TILE, block_size(K)), USE_GK=g is not None, DOT_PREC=dot_precision(q.dtype),
            UNROLL=FWD_UNROLL, DIAG_MAX=DIAG_MAX, num_warps=_warps(gk))
    return (*mats, *scaled)


def chunk_A_bwd(q, k, a, b, g, gk, dA, d_in, dgam, offsets, cmap, chunk_size):
    """dA = (dA_qk, dA_qb, dA_ak, dA_ab), d_in = (dq, dk, da, db) partial gradients [B, T, H, K] (accumulation
    dtype), dgam [NC, H, K] (None for IPLR). Returns dq, dk, da, db in the input dtype and dgk in gk's dtype
    (None for IPLR)."""
    B, T, H, K = q.shape
    C, NC = chunk_size, cmap.shape[0]
    outs = tuple(new_empty(x.shape, x.dtype, x.device) for x in (q, k, a, b))
    dgk = None if gk is None else new_empty(gk.shape, gk.dtype, gk.device)
    if NC:
        BK = min(TILE, block_size(K))
        acc = acc_dtype(q.dtype)
        dg_loc = dg_sum = None
        if gk is not None:
            dg_loc = new_empty(gk.shape, acc, gk.device)
            dg_sum = new_empty((NC, H, C // BC, K), acc, gk.device)
        launch_fitting(
            chunk_A_bwd_kernel, (triton.cdiv(K, BK), NC * (C // BC), H), q, k, a, b, g, gk, *dA, *d_in, dgam,
            *outs, dg_loc, dg_sum, offsets, cmap, H=H, K=K, C=C, BC=BC, BK=BK, USE_GK=gk is not None,
            DOT_PREC=dot_precision(q.dtype), UNROLL=BWD_UNROLL, DIAG_MAX=DIAG_MAX, num_warps=BWD_WARPS)
        if gk is not None:
            chunk_A_dgk_kernel[(triton.cdiv(K, BK), NC, H)](dg_loc, dg_sum, dgk, offsets, cmap, H=H, K=K, C=C, BC=BC,
                                                           BK=BK)
    return (*outs, dgk)
