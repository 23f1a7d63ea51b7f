"""Per-chunk outputs of the DPLR chunk form and the backward pieces that are parallel over chunks
(IPLR: USE_GK=False, the exps are 1).

With h the state entering the chunk, W = U + Wm h (state pass), Qh = q exp(G), Bt = b exp(gamma - G),
Kt = k exp(gamma - G), M the inclusive causal mask and dh the gradient of the state leaving the chunk:
    forward            O = scale (Qh h + A_qb W + A_qk V)
    local backward     dA_qk = scale (dO V^T) * M,  dA_qb = scale (dO W^T) * M,
                       dW_loc = scale A_qb^T dO,    dV_loc = scale A_qk^T dO
    state backward     dq = scale (dO h^T) exp(G),  dWm = dW h^T,  db = (W dh^T) exp(gamma - G),
                       dk = (V dh^T) exp(gamma - G),
                       dgamma = exp(gamma) rowsum(dh * h) + sum_{rows j < last}(db * b + dk * k)
Grids: (V blocks, NC, H) for O, (NC, H) for the local backward (loops over V), (K blocks, NC, H) for the state
backward (loops over V).
"""

import triton
import triton.language as tl

from ops.common.utils import acc_dtype, block_size, dot_precision, launch_fitting, new_empty, operand_type, tl_acc
from ops.generalized_delta_rule.utils import masked_exp, mat_block, seq_block, seq_row


@triton.jit
def chunk_o_fwd_kernel(qh, v, h, w, Aqk, Aqb, o, scale_ptr, offsets, cmap,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr,
                       ACC: tl.constexpr):
    """grid (V blocks, NC, H): O = scale (Qh h + A_qb W + A_qk V), Qh = q exp(G) from chunk_A."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    scale = tl.load(scale_ptr)
    ph = h + (i_c * H + i_h).to(tl.int64) * K * V
    base = (i_c * H + i_h).to(tl.int64) * C * C

    b_o = tl.zeros([C, BV], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = tl.load(seq_block(qh, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h = tl.load(mat_block(ph, K, V, i_k * BK, i_v * BV, BK, BV), boundary_check=(0, 1)).to(OP)
        b_o = tl.dot(b_q, b_h, b_o, input_precision=DOT_PREC, out_dtype=ACC)
    b_w = tl.load(seq_block(w, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
    b_v = tl.load(seq_block(v, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
    b_o = tl.dot(tl.load(mat_block(Aqb + base, C, C, 0, 0, C, C)).to(OP), b_w, b_o, input_precision=DOT_PREC,
                 out_dtype=ACC)
    b_o = tl.dot(tl.load(mat_block(Aqk + base, C, C, 0, 0, C, C)).to(OP), b_v, b_o, input_precision=DOT_PREC,
                 out_dtype=ACC)
    p_o = seq_block(o, bos, i_h, L, H, V, j * C, i_v * BV, C, BV)
    tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_o_bwd_local_kernel(v, w, do, Aqk, Aqb, dAqk, dAqb, dw, dv, scale_ptr, offsets, cmap,
                             H: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BV: tl.constexpr,
                             DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """grid (NC, H): dA_qk, dA_qb (masked, scaled), dW_loc = scale A_qb^T dO, dV_loc = scale A_qk^T dO."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = dAqk.dtype.element_ty
    scale = tl.load(scale_ptr)
    base = (i_c * H + i_h).to(tl.int64) * C * C

    b_Aqk_t = tl.trans(tl.load(mat_block(Aqk + base, C, C, 0, 0, C, C)).to(OP))
    b_Aqb_t = tl.trans(tl.load(mat_block(Aqb + base, C, C, 0, 0, C, C)).to(OP))
    b_dqk = tl.zeros([C, C], dtype=ACC)
    b_dqb = tl.zeros([C, C], dtype=ACC)
    for i_v in range(tl.cdiv(V, BV)):
        b_do = tl.load(seq_block(do, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_v = tl.load(seq_block(v, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_w = tl.load(seq_block(w, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_dqk = tl.dot(b_do, tl.trans(b_v), b_dqk, input_precision=DOT_PREC, out_dtype=ACC)
        b_dqb = tl.dot(b_do, tl.trans(b_w), b_dqb, input_precision=DOT_PREC, out_dtype=ACC)
        p_dw = seq_block(dw, bos, i_h, L, H, V, j * C, i_v * BV, C, BV)
        b_dw = tl.dot(b_Aqb_t, b_do, input_precision=DOT_PREC, out_dtype=ACC) * scale
        tl.store(p_dw, b_dw.to(p_dw.dtype.element_ty), boundary_check=(0, 1))
        p_dv = seq_block(dv, bos, i_h, L, H, V, j * C, i_v * BV, C, BV)
        b_dv = tl.dot(b_Aqk_t, b_do, input_precision=DOT_PREC, out_dtype=ACC) * scale
        tl.store(p_dv, b_dv.to(p_dv.dtype.element_ty), boundary_check=(0, 1))
    incl = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    tl.store(mat_block(dAqk + base, C, C, 0, 0, C, C), tl.where(incl, b_dqk * scale, 0.0))
    tl.store(mat_block(dAqb + base, C, C, 0, 0, C, C), tl.where(incl, b_dqb * scale, 0.0))


@triton.jit
def chunk_o_bwd_state_kernel(k, b, v, g, h, w, do, dh, dw, dq, dk, db, dwm, dgam, scale_ptr, offsets, cmap,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr,
                             OP: tl.constexpr):
    """grid (K blocks, NC, H): the gradients that flow through the states h (entering) and dh (leaving); rowsum(dh * h)
    from the stored states (in their storage dtype), the products from their OP copies."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    nv = tl.minimum(L - j * C, C)
    ACC = dq.dtype.element_ty
    scale = tl.load(scale_ptr)
    ph = h + (i_c * H + i_h).to(tl.int64) * K * V
    pdh = dh + (i_c * H + i_h).to(tl.int64) * K * V

    b_dq = tl.zeros([C, BK], dtype=ACC)   # dO h^T
    b_dwm = tl.zeros([C, BK], dtype=ACC)  # dW h^T
    b_db = tl.zeros([C, BK], dtype=ACC)   # W dh^T
    b_dk = tl.zeros([C, BK], dtype=ACC)   # V dh^T
    b_hdh = tl.zeros([BK], dtype=ACC)     # rowsum(dh * h)
    for i_v in range(tl.cdiv(V, BV)):
        b_h = tl.load(mat_block(ph, K, V, i_k * BK, i_v * BV, BK, BV), boundary_check=(0, 1))
        b_dh = tl.load(mat_block(pdh, K, V, i_k * BK, i_v * BV, BK, BV), boundary_check=(0, 1))
        b_do = tl.load(seq_block(do, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_dw = tl.load(seq_block(dw, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_w = tl.load(seq_block(w, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_v = tl.load(seq_block(v, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        if USE_GK:
            b_hdh += tl.sum(b_h.to(ACC) * b_dh.to(ACC), 1)
        b_ht = tl.trans(b_h.to(OP))
        b_dht = tl.trans(b_dh.to(OP))
        b_dq = tl.dot(b_do, b_ht, b_dq, input_precision=DOT_PREC, out_dtype=ACC)
        b_dwm = tl.dot(b_dw, b_ht, b_dwm, input_precision=DOT_PREC, out_dtype=ACC)
        b_db = tl.dot(b_w, b_dht, b_db, input_precision=DOT_PREC, out_dtype=ACC)
        b_dk = tl.dot(b_v, b_dht, b_dk, input_precision=DOT_PREC, out_dtype=ACC)
    b_dq *= scale
    if USE_GK:
        vi = (tl.arange(0, C) < nv)[:, None]
        b_g = tl.load(seq_block(g, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1))
        b_gam = seq_row(g, bos, i_h, j * C + nv - 1, H, K, i_k * BK, BK)
        b_dq *= masked_exp(b_g, vi)
        f = masked_exp(b_gam[None, :] - b_g, vi)
        b_db *= f
        b_dk *= f
        b_k = tl.load(seq_block(k, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(ACC)
        b_b = tl.load(seq_block(b, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(ACC)
        # (the last row's terms have exp(gamma - G_last) = 1 exactly: they cancel against its dG terms and are
        # left out of both, see chunk_A.py)
        b_dgam = tl.exp(b_gam) * b_hdh + tl.sum(tl.where(tl.arange(0, C)[:, None] < nv - 1,
                                                         b_db * b_b + b_dk * b_k, 0.0), 0)
        o_k = i_k * BK + tl.arange(0, BK)
        tl.store(dgam + (i_c * H + i_h).to(tl.int64) * K + o_k, b_dgam, mask=o_k < K)
    tl.store(seq_block(dq, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), b_dq, boundary_check=(0, 1))
    p_dwm = seq_block(dwm, bos, i_h, L, H, K, j * C, i_k * BK, C, BK)
    tl.store(p_dwm, b_dwm.to(p_dwm.dtype.element_ty), boundary_check=(0, 1))
    tl.store(seq_block(db, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), b_db, boundary_check=(0, 1))
    tl.store(seq_block(dk, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), b_dk, boundary_check=(0, 1))


# Largest K / V tile (tests lower it to reach the multi-tile loops with small head sizes).
TILE = 64
# num_warps of chunk_o_bwd_state. ptxas (sm_90, bf16, K = V = 128, C = 64): 540 B spilled a thread at 4 warps, none
# at 8. H100 at the point: 3.12 ms at 4 -> 1.77 at 8 (float32 operands, GPU visit 15); with half operands 1.90 at 4,
# 1.66 at 8 (visit 16).
BWD_STATE_WARPS = 8


def _blocks(K, V):
    return min(TILE, block_size(K)), min(TILE, block_size(V))


def operands(dtype, C, K, V):
    """(forward, local backward, state backward) dot operand types (utils.operand_type)."""
    BK, BV = _blocks(K, V)
    return (operand_type("dplr_chunk_o_fwd", dtype, C, BK, BV), operand_type("dplr_chunk_o_bwd_local", dtype, C, BV),
            operand_type("dplr_chunk_o_bwd_state", dtype, C, BK, BV))


def chunk_o_fwd(qh, v, h, w, Aqk, Aqb, scale_t, offsets, cmap, chunk_size):
    """qh = q exp(G) (q for IPLR). Returns o [B, T, H, V] in v's dtype (the input dtype)."""
    B, T, H, K = qh.shape
    V = v.shape[-1]
    NC = cmap.shape[0]
    o = new_empty((B, T, H, V), v.dtype, v.device)
    if NC:
        BK, BV = _blocks(K, V)
        launch_fitting(
            chunk_o_fwd_kernel, (triton.cdiv(V, BV), NC, H), qh, v, h, w, Aqk, Aqb, o, scale_t, offsets, cmap, H=H,
            K=K, V=V, C=chunk_size, BK=BK, BV=BV, DOT_PREC=dot_precision(v.dtype),
            OP=operands(v.dtype, chunk_size, K, V)[0], ACC=tl_acc(v.dtype))
    return o


def chunk_o_bwd_local(v, w, do, Aqk, Aqb, scale_t, offsets, cmap, chunk_size, dw_dtype=None, dv_dtype=None):
    """Returns dA_qk, dA_qb [NC, H, C, C] (accumulation dtype) and dW_loc, dV_loc [B, T, H, V] (in dw_dtype,
    dv_dtype: the accumulation dtype by default)."""
    B, T, H, V = v.shape
    C, NC, acc = chunk_size, cmap.shape[0], acc_dtype(v.dtype)
    dAqk = new_empty((NC, H, C, C), acc, v.device)
    dAqb = new_empty((NC, H, C, C), acc, v.device)
    dw = new_empty((B, T, H, V), dw_dtype or acc, v.device)
    dv = new_empty((B, T, H, V), dv_dtype or acc, v.device)
    if NC:
        BV = _blocks(1, V)[1]
        launch_fitting(
            chunk_o_bwd_local_kernel, (NC, H), v, w, do, Aqk, Aqb, dAqk, dAqb, dw, dv, scale_t, offsets, cmap, H=H, V=V,
            C=C, BV=BV, DOT_PREC=dot_precision(v.dtype), OP=operands(v.dtype, C, 1, V)[1])
    return dAqk, dAqb, dw, dv


def chunk_o_bwd_state(k, b, v, g, h, w, do, dh, dw, scale_t, offsets, cmap, chunk_size, dwm_dtype=None):
    """Returns dq, dk, db [B, T, H, K] (the parts through the states, accumulation dtype), dWm (in dwm_dtype: the
    accumulation dtype by default) and dgamma [NC, H, K] (None for IPLR)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NC, acc = cmap.shape[0], acc_dtype(k.dtype)
    dq, dk, db = (new_empty((B, T, H, K), acc, k.device) for _ in range(3))
    dwm = new_empty((B, T, H, K), dwm_dtype or acc, k.device)
    dgam = None if g is None else new_empty((NC, H, K), acc, k.device)
    if NC:
        BK, BV = _blocks(K, V)
        launch_fitting(
            chunk_o_bwd_state_kernel, (triton.cdiv(K, BK), NC, H), k, b, v, g, h, w, do, dh, dw, dq, dk, db, dwm, dgam,
            scale_t, offsets, cmap, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, USE_GK=g is not None,
            DOT_PREC=dot_precision(k.dtype), OP=operands(k.dtype, chunk_size, K, V)[2], num_warps=BWD_STATE_WARPS)
    return dq, dk, db, dwm, dgam
