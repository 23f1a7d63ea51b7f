"""The inter-chunk state pass of the DPLR chunk form (IPLR: USE_GK=False): sequential over each sequence's chunks.

With gamma = G_last (the chunk's total log decay), Bt = b exp(gamma - G), Kt = k exp(gamma - G) (both <= 1 in
the exps), Qh = q exp(G), and Wm, U from the WY stage:
Forward, h_0 = S0 (or 0), per chunk:
    store h;   W = U + Wm h (store);   h <- exp(gamma) * h + Bt^T W + Kt^T V;   final state = h.
Backward, reverse over chunks, dh = dht (or 0); dW_loc, dV_loc from chunk_o's local backward:
    store dh (the gradient of the state leaving the chunk);
    dW = dW_loc + Bt dh (store);   dV = dV_loc + Kt dh (store);
    dh <- exp(gamma) * dh + scale Qh^T dO + Wm^T dW;   dS0 = dh.
Grid (V blocks, N * H); a program keeps all K rows and BV columns of the state in registers ([BK, BV] with
BK * BV <= 4096 fp32 elements: K = 128 gives BV = 32) on 8 warps and stores per-chunk states [NC, H, K, V] in
the accumulation dtype.
"""
import triton
import triton.language as tl

from ops.common.utils import acc_dtype, dot_precision, interpreting, launch_fitting, new_empty
from ops.generalized_delta_rule.utils import masked_exp, mat_block, seq_block, seq_row, state_tile


@triton.jit
def _decays(g, bos, i_h, L, j, nv, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr):
    """(exp(gamma) [BK], exp(G) [C, BK], exp(gamma - G) [C, BK]) for this chunk (0 on rows past its end), from one
    load of G."""
    b_gam = seq_row(g, bos, i_h, j * C + nv - 1, H, K, 0, BK)
    b_g = tl.load(seq_block(g, bos, i_h, L, H, K, j * C, 0, C, BK), boundary_check=(0, 1))
    vi = (tl.arange(0, C) < nv)[:, None]
    return tl.exp(b_gam), masked_exp(b_g, vi), masked_exp(b_gam[None, :] - b_g, vi)


@triton.jit
def _fwd_step(t, b_h, k, b, v, g, wm, u, h, w, bos, i_h, L, c0, v0,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Chunk t: store h; W = U + Wm h (store); h = exp(gamma) h + Bt^T W + Kt^T V."""
    ACC = b_h.dtype
    ph = h + ((c0 + t) * H + i_h) * K * V
    tl.store(mat_block(ph, K, V, 0, v0, BK, BV), b_h, boundary_check=(0, 1))
    b_wm = tl.load(seq_block(wm, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1))
    b_w = tl.load(seq_block(u, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1))
    b_w += tl.dot(b_wm, b_h, input_precision=DOT_PREC)
    tl.store(seq_block(w, bos, i_h, L, H, V, t * C, v0, C, BV), b_w, boundary_check=(0, 1))

    b_k = tl.load(seq_block(k, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(ACC)
    b_b = tl.load(seq_block(b, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(ACC)
    b_v = tl.load(seq_block(v, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
    if USE_GK:
        nv = tl.minimum(L - t * C, C)
        b_eg, _, b_f = _decays(g, bos, i_h, L, t, nv, H, K, C, BK)
        b_k *= b_f
        b_b *= b_f
        b_h *= b_eg[:, None]
    b_h += tl.dot(tl.trans(b_b), b_w, input_precision=DOT_PREC)
    b_h += tl.dot(tl.trans(b_k), b_v, input_precision=DOT_PREC)
    return b_h


@triton.jit
def chunk_h_fwd_kernel(k, b, v, g, wm, u, h, w, h0, ht, offsets, chunk_offsets,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr,
                       USE_S0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PREC: tl.constexpr,
                       WHILE_LOOP: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    ACC = h.dtype.element_ty
    v0 = i_v * BV

    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_S0:
        b_h += tl.load(mat_block(h0 + i_nh.to(tl.int64) * K * V, K, V, 0, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
    NT = tl.cdiv(L, C).to(tl.int32)
    if WHILE_LOOP:  # the interpreter cannot range() over a loaded bound
        t = 0
        while t < NT:
            b_h = _fwd_step(t, b_h, k, b, v, g, wm, u, h, w, bos, i_h, L, c0, v0, H, K, V, C, BK, BV, USE_GK,
                            DOT_PREC)
            t += 1
    else:
        for t in range(NT):
            b_h = _fwd_step(t, b_h, k, b, v, g, wm, u, h, w, bos, i_h, L, c0, v0, H, K, V, C, BK, BV, USE_GK,
                            DOT_PREC)
    if STORE_FINAL:
        tl.store(mat_block(ht + i_nh.to(tl.int64) * K * V, K, V, 0, v0, BK, BV), b_h, boundary_check=(0, 1))


@triton.jit
def _bwd_step(t, b_dh, q, k, b, g, wm, do, dw_loc, dv_loc, dh, dw, dv, scale, bos, i_h, L, c0, v0,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Chunk t (reverse order): store dh; dW = dW_loc + Bt dh; dV = dV_loc + Kt dh;
    dh = exp(gamma) dh + scale Qh^T dO + Wm^T dW."""
    ACC = b_dh.dtype
    ph = dh + ((c0 + t) * H + i_h) * K * V
    tl.store(mat_block(ph, K, V, 0, v0, BK, BV), b_dh, boundary_check=(0, 1))
    b_q = tl.load(seq_block(q, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(ACC)
    b_k = tl.load(seq_block(k, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(ACC)
    b_b = tl.load(seq_block(b, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(ACC)
    if USE_GK:
        nv = tl.minimum(L - t * C, C)
        b_eg, b_e, b_f = _decays(g, bos, i_h, L, t, nv, H, K, C, BK)
        b_k *= b_f
        b_b *= b_f
        b_q *= b_e
    b_dw = tl.load(seq_block(dw_loc, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1))
    b_dw += tl.dot(b_b, b_dh, input_precision=DOT_PREC)
    tl.store(seq_block(dw, bos, i_h, L, H, V, t * C, v0, C, BV), b_dw, boundary_check=(0, 1))
    b_dv = tl.load(seq_block(dv_loc, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1))
    b_dv += tl.dot(b_k, b_dh, input_precision=DOT_PREC)
    tl.store(seq_block(dv, bos, i_h, L, H, V, t * C, v0, C, BV), b_dv, boundary_check=(0, 1))

    b_do = tl.load(seq_block(do, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC) * scale
    b_wm = tl.load(seq_block(wm, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1))
    if USE_GK:
        b_dh *= b_eg[:, None]
    b_dh += tl.dot(tl.trans(b_q), b_do, input_precision=DOT_PREC)
    b_dh += tl.dot(tl.trans(b_wm), b_dw, input_precision=DOT_PREC)
    return b_dh


@triton.jit
def chunk_h_bwd_kernel(q, k, b, g, wm, do, dw_loc, dv_loc, dh, dw, dv, dht, ds0, offsets, chunk_offsets, scale_ptr,
                       H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, USE_GK: tl.constexpr,
                       USE_DHT: tl.constexpr, STORE_DS0: tl.constexpr, DOT_PREC: tl.constexpr,
                       WHILE_LOOP: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    ACC = dh.dtype.element_ty
    v0 = i_v * BV
    scale = tl.load(scale_ptr)

    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(mat_block(dht + i_nh.to(tl.int64) * K * V, K, V, 0, v0, BK, BV),
                        boundary_check=(0, 1)).to(ACC)
    NT = tl.cdiv(L, C).to(tl.int32)
    if WHILE_LOOP:  # the interpreter cannot range() over a loaded bound
        t = NT - 1
        while t >= 0:
            b_dh = _bwd_step(t, b_dh, q, k, b, g, wm, do, dw_loc, dv_loc, dh, dw, dv, scale, bos, i_h, L, c0, v0,
                             H, K, V, C, BK, BV, USE_GK, DOT_PREC)
            t -= 1
    else:
        for s in range(NT):
            b_dh = _bwd_step(NT - 1 - s, b_dh, q, k, b, g, wm, do, dw_loc, dv_loc, dh, dw, dv, scale, bos, i_h, L,
                             c0, v0, H, K, V, C, BK, BV, USE_GK, DOT_PREC)
    if STORE_DS0:
        p0 = mat_block(ds0 + i_nh.to(tl.int64) * K * V, K, V, 0, v0, BK, BV)
        tl.store(p0, b_dh.to(p0.dtype.element_ty), boundary_check=(0, 1))


# State-tile budget (elements of the accumulation dtype per program; tests lower it to split V) and warps. ptxas
# (sm_90, bf16, K = V = 128, C = 64): at 8192 and 4 warps the launched kernels spill 328 (DPLR fwd) to 856 B
# (DPLR bwd) a thread, 1376 / 636 B for IPLR; at 4096 and 8 warps 24-224 B, with twice the programs.
BUDGET = 4096
NUM_WARPS = 8


def _blocks(K, V, dtype):
    return state_tile(K, V, BUDGET, dtype)


def chunk_h_fwd(k, b, v, g, wm, u, initial_state, output_final_state, offsets, chunk_offsets, NC, chunk_size):
    """Returns h [NC, H, K, V] (state entering each chunk), W [B, T, H, V] and the final state [N, H, K, V]
    (or None), all in the accumulation dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    N, acc = offsets.numel() - 1, acc_dtype(k.dtype)
    h = new_empty((NC, H, K, V), acc, k.device)
    w = new_empty((B, T, H, V), acc, k.device)
    ht = new_empty((N, H, K, V), acc, k.device) if output_final_state else None
    BK, BV = _blocks(K, V, k.dtype)
    if N * H:
        launch_fitting(
            chunk_h_fwd_kernel, (triton.cdiv(V, BV), N * H), k, b, v, g, wm, u, h, w, initial_state, ht, offsets,
            chunk_offsets, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, USE_GK=g is not None,
            USE_S0=initial_state is not None, STORE_FINAL=ht is not None, DOT_PREC=dot_precision(k.dtype),
            WHILE_LOOP=interpreting(), num_warps=NUM_WARPS)
    return h, w, ht


def chunk_h_bwd(q, k, b, g, wm, do, dw_loc, dv_loc, dht, initial_state, scale_t, offsets, chunk_offsets, NC,
                chunk_size):
    """Returns dh [NC, H, K, V] (gradient of the state leaving each chunk), dW, dV [B, T, H, V] (accumulation
    dtype; dV without the WY term) and dS0 in initial_state's dtype (None without initial_state)."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    N, acc = offsets.numel() - 1, acc_dtype(k.dtype)
    dh = new_empty((NC, H, K, V), acc, k.device)
    dw = new_empty((B, T, H, V), acc, k.device)
    dv = new_empty((B, T, H, V), acc, k.device)
    ds0 = None if initial_state is None else new_empty((N, H, K, V), initial_state.dtype, k.device)
    BK, BV = _blocks(K, V, k.dtype)
    if N * H:
        launch_fitting(
            chunk_h_bwd_kernel, (triton.cdiv(V, BV), N * H), q, k, b, g, wm, do, dw_loc, dv_loc, dh, dw, dv, dht, ds0,
            offsets, chunk_offsets, scale_t, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, USE_GK=g is not None,
            USE_DHT=dht is not None, STORE_DS0=ds0 is not None, DOT_PREC=dot_precision(k.dtype),
            WHILE_LOOP=interpreting(), num_warps=NUM_WARPS)
    return dh, dw, dv, ds0
