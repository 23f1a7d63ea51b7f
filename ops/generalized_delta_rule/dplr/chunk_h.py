"""The inter-chunk state pass of the DPLR chunk form (IPLR: USE_GK=False): sequential over each sequence's chunks.

With gamma = G_last (the chunk's total log decay), Bt = b exp(gamma - G), Kt = k exp(gamma - G) (both <= 1 in
the exps), Qh = q exp(G) (all three from chunk_A), and Wm, U from the WY stage:
Forward, h_0 = S0 (or 0), per chunk:
    store h;   W = U + Wm h (store);   h <- exp(gamma) * h + Bt^T W + Kt^T V;   final state = h.
Backward, reverse over chunks, dh = dht (or 0); dW_loc, dV_loc from chunk_o's local backward:
    store dh (the gradient of the state leaving the chunk);
    dW = dW_loc + Bt dh (store);   dV = dV_loc + Kt dh (store);
    dh <- exp(gamma) * dh + scale Qh^T dO + Wm^T dW;   dS0 = dh.
The decays act per key channel, so each K tile of the state takes its own columns of Kt, Bt, Qh (formed by chunk_A,
stored in their operand type), gamma and Wm.
Grid (V blocks, N * H). A program holds BV columns of the [K, V] state in registers as up to four [BK, BV] tiles
(BK = BV = 64 for K, V >= 64; BK doubles past K = 256), in the accumulation dtype, on 4 warps (8 backward); states
[NC, H, K, V], W, dW and dV are stored in the dtypes dplr/chunk.py's storage() gives (the final state and dS0 in
the accumulation dtype). tl.dot operands are OP (utils.operand_type: the
half input dtype where the switch names the kernel and C = BK = BV >= 32, else the accumulation dtype), accumulated
in the accumulation dtype.
"""
import triton
import triton.language as tl

from ops.common.utils import (
    acc_dtype,
    block_size,
    dot_precision,
    interpreting,
    launch_fitting,
    new_empty,
    operand_type,
    tl_acc,
)
from ops.generalized_delta_rule.utils import mat_block, seq_block, seq_row


@triton.jit
def _exp_gamma(g, bos, i_h, j, nv, k0, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """exp(gamma) [BK] on K columns k0.. of chunk j: exp of G's last valid row."""
    return tl.exp(seq_row(g, bos, i_h, j * C + nv - 1, H, K, k0, BK))


@triton.jit
def _add_state(b_h0, b_h1, b_h2, b_h3, p, K: tl.constexpr, V: tl.constexpr, v0, BK: tl.constexpr,
               BV: tl.constexpr, NK: tl.constexpr):
    """The NK state tiles plus rows i BK.., columns v0.. of the [K, V] matrix at p."""
    ACC = b_h0.dtype
    b_h0 += tl.load(mat_block(p, K, V, 0, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
    if NK > 1:
        b_h1 += tl.load(mat_block(p, K, V, BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
    if NK > 2:
        b_h2 += tl.load(mat_block(p, K, V, 2 * BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
    if NK > 3:
        b_h3 += tl.load(mat_block(p, K, V, 3 * BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
    return b_h0, b_h1, b_h2, b_h3


@triton.jit
def _store_state(p, b_h0, b_h1, b_h2, b_h3, K: tl.constexpr, V: tl.constexpr, v0, BK: tl.constexpr,
                 BV: tl.constexpr, NK: tl.constexpr):
    """Stores the NK state tiles as rows i BK.., columns v0.. of the [K, V] matrix at p (in its dtype)."""
    DT = p.dtype.element_ty
    tl.store(mat_block(p, K, V, 0, v0, BK, BV), b_h0.to(DT), boundary_check=(0, 1))
    if NK > 1:
        tl.store(mat_block(p, K, V, BK, v0, BK, BV), b_h1.to(DT), boundary_check=(0, 1))
    if NK > 2:
        tl.store(mat_block(p, K, V, 2 * BK, v0, BK, BV), b_h2.to(DT), boundary_check=(0, 1))
    if NK > 3:
        tl.store(mat_block(p, K, V, 3 * BK, v0, BK, BV), b_h3.to(DT), boundary_check=(0, 1))


@triton.jit
def _wm_dot(b_acc, b_x, wm, bos, i_h, L, t, k0, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
            BK: tl.constexpr, TRANS: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """b_acc + Wm b_x [C, BV] (b_x a state tile), or with TRANS b_acc + Wm^T b_x [BK, BV] (b_x = dW), Wm's K
    columns k0..; operands in OP."""
    if TRANS:  # (a column-major view of the same rows: a transposed register tile loads element by element)
        p_wm = tl.make_block_ptr(wm + (bos * H + i_h) * K, (K, L), (1, H * K), (k0, t * C), (BK, C), (0, 1))
    else:
        p_wm = seq_block(wm, bos, i_h, L, H, K, t * C, k0, C, BK)
    b_wm = tl.load(p_wm, boundary_check=(0, 1)).to(OP)
    return tl.dot(b_wm, b_x.to(OP), b_acc, input_precision=DOT_PREC, out_dtype=b_acc.dtype)


@triton.jit
def _fwd_tile(b_h, kt, bt, g, b_w, b_v, bos, i_h, L, t, nv, k0, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
              BK: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """The state tile of K rows k0..: h <- exp(gamma) h + Bt^T W + Kt^T V (b_w, b_v: W and V in OP)."""
    b_k = tl.load(seq_block(kt, bos, i_h, L, H, K, t * C, k0, C, BK), boundary_check=(0, 1)).to(OP)
    b_b = tl.load(seq_block(bt, bos, i_h, L, H, K, t * C, k0, C, BK), boundary_check=(0, 1)).to(OP)
    if USE_GK:
        b_h *= _exp_gamma(g, bos, i_h, t, nv, k0, H, K, C, BK)[:, None]
    b_h = tl.dot(tl.trans(b_b), b_w, b_h, input_precision=DOT_PREC, out_dtype=b_h.dtype)
    return tl.dot(tl.trans(b_k), b_v, b_h, input_precision=DOT_PREC, out_dtype=b_h.dtype)


@triton.jit
def _fwd_step(t, b_h0, b_h1, b_h2, b_h3, kt, bt, v, g, wm, u, h, w, bos, i_h, L, c0, v0,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr, NK: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """Chunk t: store h; W = U + Wm h (store); h <- exp(gamma) h + Bt^T W + Kt^T V."""
    ACC = b_h0.dtype
    _store_state(h + ((c0 + t) * H + i_h) * K * V, b_h0, b_h1, b_h2, b_h3, K, V, v0, BK, BV, NK)
    # W = Wm h summed over the K tiles, then + U
    b_w = _wm_dot(tl.zeros([C, BV], dtype=ACC), b_h0, wm, bos, i_h, L, t, 0, H, K, C, BK, False, DOT_PREC, OP)
    if NK > 1:
        b_w = _wm_dot(b_w, b_h1, wm, bos, i_h, L, t, BK, H, K, C, BK, False, DOT_PREC, OP)
    if NK > 2:
        b_w = _wm_dot(b_w, b_h2, wm, bos, i_h, L, t, 2 * BK, H, K, C, BK, False, DOT_PREC, OP)
    if NK > 3:
        b_w = _wm_dot(b_w, b_h3, wm, bos, i_h, L, t, 3 * BK, H, K, C, BK, False, DOT_PREC, OP)
    b_w += tl.load(seq_block(u, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
    tl.store(seq_block(w, bos, i_h, L, H, V, t * C, v0, C, BV), b_w.to(w.dtype.element_ty), boundary_check=(0, 1))

    b_w = b_w.to(OP)
    b_v = tl.load(seq_block(v, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(OP)
    nv = tl.minimum(L - t * C, C)
    b_h0 = _fwd_tile(b_h0, kt, bt, g, b_w, b_v, bos, i_h, L, t, nv, 0, H, K, C, BK, USE_GK, DOT_PREC, OP)
    if NK > 1:
        b_h1 = _fwd_tile(b_h1, kt, bt, g, b_w, b_v, bos, i_h, L, t, nv, BK, H, K, C, BK, USE_GK, DOT_PREC, OP)
    if NK > 2:
        b_h2 = _fwd_tile(b_h2, kt, bt, g, b_w, b_v, bos, i_h, L, t, nv, 2 * BK, H, K, C, BK, USE_GK, DOT_PREC, OP)
    if NK > 3:
        b_h3 = _fwd_tile(b_h3, kt, bt, g, b_w, b_v, bos, i_h, L, t, nv, 3 * BK, H, K, C, BK, USE_GK, DOT_PREC, OP)
    return b_h0, b_h1, b_h2, b_h3


@triton.jit
def chunk_h_fwd_kernel(kt, bt, v, g, wm, u, h, w, h0, ht, offsets, chunk_offsets,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, USE_GK: tl.constexpr,
                       USE_S0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PREC: tl.constexpr,
                       OP: tl.constexpr, WHILE_LOOP: tl.constexpr, ACC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    v0 = i_v * BV

    b_h0 = tl.zeros([BK, BV], dtype=ACC)
    b_h1 = tl.zeros([BK, BV], dtype=ACC)
    b_h2 = tl.zeros([BK, BV], dtype=ACC)
    b_h3 = tl.zeros([BK, BV], dtype=ACC)
    if USE_S0:
        b_h0, b_h1, b_h2, b_h3 = _add_state(b_h0, b_h1, b_h2, b_h3, h0 + i_nh.to(tl.int64) * K * V, K, V, v0, BK,
                                            BV, NK)
    NT = tl.cdiv(L, C).to(tl.int32)
    if WHILE_LOOP:  # the interpreter cannot range() over a loaded bound
        t = 0
        while t < NT:
            b_h0, b_h1, b_h2, b_h3 = _fwd_step(t, b_h0, b_h1, b_h2, b_h3, kt, bt, v, g, wm, u, h, w, bos, i_h, L, c0,
                                               v0, H, K, V, C, BK, BV, NK, USE_GK, DOT_PREC, OP)
            t += 1
    else:
        for t in range(NT):
            b_h0, b_h1, b_h2, b_h3 = _fwd_step(t, b_h0, b_h1, b_h2, b_h3, kt, bt, v, g, wm, u, h, w, bos, i_h, L, c0,
                                               v0, H, K, V, C, BK, BV, NK, USE_GK, DOT_PREC, OP)
    if STORE_FINAL:
        _store_state(ht + i_nh.to(tl.int64) * K * V, b_h0, b_h1, b_h2, b_h3, K, V, v0, BK, BV, NK)


@triton.jit
def _bt_dh(b_acc, b_dh, bt, bos, i_h, L, t, k0, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr,
           BK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """b_acc + Bt dh on K columns k0.. (b_dh the state tile of those rows)."""
    b_b = tl.load(seq_block(bt, bos, i_h, L, H, K, t * C, k0, C, BK), boundary_check=(0, 1)).to(OP)
    return tl.dot(b_b, b_dh.to(OP), b_acc, input_precision=DOT_PREC, out_dtype=b_acc.dtype)


@triton.jit
def _bwd_tile(b_dh, qh, kt, g, wm, b_do, b_dw, b_dv, bos, i_h, L, t, nv, k0, H: tl.constexpr, K: tl.constexpr,
              C: tl.constexpr, BK: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """The dh tile of K rows k0..: dV += Kt dh; dh <- exp(gamma) dh + Qh^T (scale dO) + Wm^T dW (b_do, b_dw:
    scale dO and the complete dW in OP)."""
    ACC = b_dh.dtype
    b_q = tl.load(seq_block(qh, bos, i_h, L, H, K, t * C, k0, C, BK), boundary_check=(0, 1)).to(OP)
    b_k = tl.load(seq_block(kt, bos, i_h, L, H, K, t * C, k0, C, BK), boundary_check=(0, 1)).to(OP)
    b_dv = tl.dot(b_k, b_dh.to(OP), b_dv, input_precision=DOT_PREC, out_dtype=ACC)
    if USE_GK:
        b_dh *= _exp_gamma(g, bos, i_h, t, nv, k0, H, K, C, BK)[:, None]
    b_dh = tl.dot(tl.trans(b_q), b_do, b_dh, input_precision=DOT_PREC, out_dtype=ACC)
    b_dh = _wm_dot(b_dh, b_dw, wm, bos, i_h, L, t, k0, H, K, C, BK, True, DOT_PREC, OP)
    return b_dh, b_dv


@triton.jit
def _bwd_step(t, b_dh0, b_dh1, b_dh2, b_dh3, qh, kt, bt, g, wm, do, dw_loc, dv_loc, dh, dw, dv, scale, bos, i_h, L,
              c0, v0, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr, NK: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """Chunk t (reverse order): store dh; dW = dW_loc + Bt dh; dV = dV_loc + Kt dh;
    dh <- exp(gamma) dh + scale Qh^T dO + Wm^T dW."""
    ACC = b_dh0.dtype
    _store_state(dh + ((c0 + t) * H + i_h) * K * V, b_dh0, b_dh1, b_dh2, b_dh3, K, V, v0, BK, BV, NK)
    nv = tl.minimum(L - t * C, C)
    # dW = Bt dh summed over the K tiles, then + dW_loc
    b_dw = _bt_dh(tl.zeros([C, BV], dtype=ACC), b_dh0, bt, bos, i_h, L, t, 0, H, K, C, BK, DOT_PREC, OP)
    if NK > 1:
        b_dw = _bt_dh(b_dw, b_dh1, bt, bos, i_h, L, t, BK, H, K, C, BK, DOT_PREC, OP)
    if NK > 2:
        b_dw = _bt_dh(b_dw, b_dh2, bt, bos, i_h, L, t, 2 * BK, H, K, C, BK, DOT_PREC, OP)
    if NK > 3:
        b_dw = _bt_dh(b_dw, b_dh3, bt, bos, i_h, L, t, 3 * BK, H, K, C, BK, DOT_PREC, OP)
    b_dw += tl.load(seq_block(dw_loc, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
    tl.store(seq_block(dw, bos, i_h, L, H, V, t * C, v0, C, BV), b_dw.to(dw.dtype.element_ty),
             boundary_check=(0, 1))

    # per K tile: dV += Kt dh, then the tile's update
    b_dw = b_dw.to(OP)
    b_do = (tl.load(seq_block(do, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
            * scale).to(OP)
    b_dv = tl.zeros([C, BV], dtype=ACC)
    b_dh0, b_dv = _bwd_tile(b_dh0, qh, kt, g, wm, b_do, b_dw, b_dv, bos, i_h, L, t, nv, 0, H, K, C, BK, USE_GK,
                            DOT_PREC, OP)
    if NK > 1:
        b_dh1, b_dv = _bwd_tile(b_dh1, qh, kt, g, wm, b_do, b_dw, b_dv, bos, i_h, L, t, nv, BK, H, K, C, BK, USE_GK,
                                DOT_PREC, OP)
    if NK > 2:
        b_dh2, b_dv = _bwd_tile(b_dh2, qh, kt, g, wm, b_do, b_dw, b_dv, bos, i_h, L, t, nv, 2 * BK, H, K, C, BK,
                                USE_GK, DOT_PREC, OP)
    if NK > 3:
        b_dh3, b_dv = _bwd_tile(b_dh3, qh, kt, g, wm, b_do, b_dw, b_dv, bos, i_h, L, t, nv, 3 * BK, H, K, C, BK,
                                USE_GK, DOT_PREC, OP)
    b_dv += tl.load(seq_block(dv_loc, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
    tl.store(seq_block(dv, bos, i_h, L, H, V, t * C, v0, C, BV), b_dv.to(dv.dtype.element_ty),
             boundary_check=(0, 1))
    return b_dh0, b_dh1, b_dh2, b_dh3


@triton.jit
def chunk_h_bwd_kernel(qh, kt, bt, g, wm, do, dw_loc, dv_loc, dh, dw, dv, dht, ds0, offsets, chunk_offsets, scale_ptr,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, USE_GK: tl.constexpr,
                       USE_DHT: tl.constexpr, STORE_DS0: tl.constexpr, DOT_PREC: tl.constexpr,
                       OP: tl.constexpr, WHILE_LOOP: tl.constexpr, ACC: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    v0 = i_v * BV
    scale = tl.load(scale_ptr)

    b_dh0 = tl.zeros([BK, BV], dtype=ACC)
    b_dh1 = tl.zeros([BK, BV], dtype=ACC)
    b_dh2 = tl.zeros([BK, BV], dtype=ACC)
    b_dh3 = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh0, b_dh1, b_dh2, b_dh3 = _add_state(b_dh0, b_dh1, b_dh2, b_dh3, dht + i_nh.to(tl.int64) * K * V, K, V,
                                                v0, BK, BV, NK)
    NT = tl.cdiv(L, C).to(tl.int32)
    if WHILE_LOOP:  # the interpreter cannot range() over a loaded bound
        t = NT - 1
        while t >= 0:
            b_dh0, b_dh1, b_dh2, b_dh3 = _bwd_step(t, b_dh0, b_dh1, b_dh2, b_dh3, qh, kt, bt, g, wm, do, dw_loc, dv_loc,
                                                   dh, dw, dv, scale, bos, i_h, L, c0, v0, H, K, V, C, BK, BV, NK,
                                                   USE_GK, DOT_PREC, OP)
            t -= 1
    else:
        for s in range(NT):
            b_dh0, b_dh1, b_dh2, b_dh3 = _bwd_step(NT - 1 - s, b_dh0, b_dh1, b_dh2, b_dh3, qh, kt, bt, g, wm, do,
                                                   dw_loc, dv_loc, dh, dw, dv, scale, bos, i_h, L, c0, v0, H, K, V, C,
                                                   BK, BV, NK, USE_GK, DOT_PREC, OP)
    if STORE_DS0:
        _store_state(ds0 + i_nh.to(tl.int64) * K * V, b_dh0, b_dh1, b_dh2, b_dh3, K, V, v0, BK, BV, NK)


# Largest K / V tile (tests lower it to reach several K tiles and V blocks with small head sizes) and warps.
# ptxas (sm_90, bf16, K = V = 128, C = 64, NK = 2): forward on 4 warps 0 B spilled with half operands (52 B
# without); backward on 8 warps 128 B with half operands, ~500 B without (4 warps: 276 / 576 B).
TILE = 64
NUM_WARPS = 4
BWD_WARPS = 8


def _blocks(K, V):
    """(BK, NK, BV): K in NK <= 4 tiles of BK rows, BV columns of V."""
    BK = min(TILE, block_size(K))
    while triton.cdiv(K, BK) > 4:
        BK *= 2
    return BK, triton.cdiv(K, BK), min(TILE, block_size(V))


def operands(dtype, C, K, V):
    """(forward, backward) dot operand types (utils.operand_type)."""
    BK, _, BV = _blocks(K, V)
    return (operand_type("dplr_chunk_h_fwd", dtype, C, BK, BV), operand_type("dplr_chunk_h_bwd", dtype, C, BK, BV))


def chunk_h_fwd(kt, bt, v, g, wm, u, initial_state, output_final_state, offsets, chunk_offsets, NC, chunk_size,
                h_dtype=None, w_dtype=None):
    """kt, bt: k exp(gamma - G), b exp(gamma - G) (k, b for IPLR) [B, T, H, K]. Returns h [NC, H, K, V] (state
    entering each chunk) in h_dtype, W [B, T, H, V] in w_dtype (both the accumulation dtype by default) and the
    final state [N, H, K, V] in the accumulation dtype (or None)."""
    B, T, H, K = kt.shape
    V = v.shape[-1]
    N, acc = offsets.numel() - 1, acc_dtype(v.dtype)
    h = new_empty((NC, H, K, V), h_dtype or acc, v.device)
    w = new_empty((B, T, H, V), w_dtype or acc, v.device)
    ht = new_empty((N, H, K, V), acc, v.device) if output_final_state else None
    BK, NK, BV = _blocks(K, V)
    if N * H:
        launch_fitting(
            chunk_h_fwd_kernel, (triton.cdiv(V, BV), N * H), kt, bt, v, g, wm, u, h, w, initial_state, ht, offsets,
            chunk_offsets, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, NK=NK, USE_GK=g is not None,
            USE_S0=initial_state is not None, STORE_FINAL=ht is not None, DOT_PREC=dot_precision(v.dtype),
            OP=operands(v.dtype, chunk_size, K, V)[0], WHILE_LOOP=interpreting(), ACC=tl_acc(v.dtype),
            num_warps=NUM_WARPS)
    return h, w, ht


def chunk_h_bwd(qh, kt, bt, g, wm, do, dw_loc, dv_loc, dht, initial_state, scale_t, offsets, chunk_offsets, NC,
                chunk_size, dh_dtype=None, dw_dtype=None, dv_dtype=None):
    """qh = q exp(G), kt, bt as for chunk_h_fwd (q, k, b for IPLR). Returns dh [NC, H, K, V] (gradient of the state
    leaving each chunk), dW, dV [B, T, H, V] (dV without the WY term) in dh_dtype, dw_dtype, dv_dtype (the
    accumulation dtype by default) and dS0 in initial_state's dtype (None without initial_state)."""
    B, T, H, K = kt.shape
    V = do.shape[-1]
    N, acc = offsets.numel() - 1, acc_dtype(do.dtype)
    dh = new_empty((NC, H, K, V), dh_dtype or acc, do.device)
    dw = new_empty((B, T, H, V), dw_dtype or acc, do.device)
    dv = new_empty((B, T, H, V), dv_dtype or acc, do.device)
    ds0 = None if initial_state is None else new_empty((N, H, K, V), initial_state.dtype, do.device)
    BK, NK, BV = _blocks(K, V)
    if N * H:
        launch_fitting(
            chunk_h_bwd_kernel, (triton.cdiv(V, BV), N * H), qh, kt, bt, g, wm, do, dw_loc, dv_loc, dh, dw, dv, dht,
            ds0, offsets, chunk_offsets, scale_t, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, NK=NK,
            USE_GK=g is not None, USE_DHT=dht is not None, STORE_DS0=ds0 is not None,
            DOT_PREC=dot_precision(do.dtype), OP=operands(do.dtype, chunk_size, K, V)[1], WHILE_LOOP=interpreting(),
            ACC=tl_acc(do.dtype), num_warps=BWD_WARPS)
    return dh, dw, dv, ds0
