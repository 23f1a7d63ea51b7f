"""The inter-chunk state pass of the chunked delta rule: sequential over the chunks of each sequence.

Forward, with h_0 = S0 (or 0) and per chunk n (W_n, U_n from the WY stage):
    store h_n;   v_new_n = U_n - W_n h_n (store);   h_{n+1} = h_n + K_n^T v_new_n;   final state = h_last.
Backward, reverse over chunks, with dh_N = dht (or 0) and dv_local = scale (Q K^T * M)^T dO from chunk_o:
    store dh_{n+1};   dv_new_n = dv_local_n + K_n dh_{n+1} (store);
    dh_n = dh_{n+1} + scale Q_n^T dO_n - W_n^T dv_new_n;   dS0 = dh_0.
With utils.FUSED_STATE the backward pass forms dv_local itself, and the forward pass the chunk's output
    O_n = scale (Q_n h_n + (Q_n K_n^T * M) v_new_n)
where its grid has more programs than SMs; where it has fewer, V is split in 32-wide blocks instead
(utils.STATE_SPLIT_V) and o is left to chunk_o_fwd.
Grid (V blocks, N * H). The [K, BV] state lives in registers as up to four [64, BV] tiles (K <= 256); states are
stored per chunk ([NC, H, K, V]), like v_new, in the dtype of their dot operands (utils.operand_storage); dv_new
in its readers' (utils.read_storage). U and dv_local may arrive in a half dtype (utils.sum_storage).
"""
import torch
import triton
import triton.language as tl

from ops.common import utils
from ops.common.utils import (
    acc_dtype,
    block_size,
    dot_precision,
    few_programs,
    interpreting,
    launch_fitting,
    new_empty,
    operand_storage,
    operand_type,
    pipeline_stages,
    tl_acc,
)


@triton.jit
def _tok(ptr, bos, i_h, L, H, D: tl.constexpr, r0, c0, BR: tl.constexpr, BC: tl.constexpr):
    """Block pointer to rows r0.. of a sequence (starting at token bos, L tokens) of a [B*T, H, D] tensor."""
    return tl.make_block_ptr(ptr + (bos * H + i_h) * D, (L, D), (H * D, 1), (r0, c0), (BR, BC), (1, 0))


@triton.jit
def _st(ptr, i_h, H, K: tl.constexpr, V: tl.constexpr, r0, c0, BR: tl.constexpr,
        BC: tl.constexpr):
    """Block pointer into the [K, V] state of head i_h of a [*, H, K, V] tensor (ptr at the first head)."""
    return tl.make_block_ptr(ptr + i_h * K * V, (K, V), (V, 1), (r0, c0), (BR, BC), (1, 0))


@triton.jit
def _qk(q, k, bos, i_h, L, H, K: tl.constexpr, r0, c0, C: tl.constexpr, BK: tl.constexpr, OP: tl.constexpr):
    """The Q and K tiles (rows r0.., columns c0..) of one chunk, in OP."""
    b_q = tl.load(_tok(q, bos, i_h, L, H, K, r0, c0, C, BK), boundary_check=(0, 1)).to(OP)
    b_k = tl.load(_tok(k, bos, i_h, L, H, K, r0, c0, C, BK), boundary_check=(0, 1)).to(OP)
    return b_q, b_k


@triton.jit
def _fwd_step(t, b_h0, b_h1, b_h2, b_h3, q, k, w, u, h, v_new, o, scale, bos, i_h, L, c0, v0,
              H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr,
              DOT_FIRST: tl.constexpr, FUSE_O: tl.constexpr):
    """Chunk t: store h_t; v_new = U - W h_t; h_{t+1} = h_t + K^T v_new (dot operands W, h, K, v_new in OP).
    DOT_FIRST: W h is summed from zero and U added after it (the dots then need not wait for U's load).
    FUSE_O: also the chunk's output block O = scale (Q h_t + (Q K^T * M) v_new) (chunk_o_fwd's, operands in OP)."""
    ACC = b_h0.dtype
    ph = h + (c0 + t) * H * K * V
    tl.store(_st(ph, i_h, H, K, V, 0, v0, BK, BV), b_h0.to(ph.dtype.element_ty), boundary_check=(0, 1))
    if NK > 1:
        tl.store(_st(ph, i_h, H, K, V, BK, v0, BK, BV), b_h1.to(ph.dtype.element_ty), boundary_check=(0, 1))
    if NK > 2:
        tl.store(_st(ph, i_h, H, K, V, 2 * BK, v0, BK, BV), b_h2.to(ph.dtype.element_ty), boundary_check=(0, 1))
    if NK > 3:
        tl.store(_st(ph, i_h, H, K, V, 3 * BK, v0, BK, BV), b_h3.to(ph.dtype.element_ty), boundary_check=(0, 1))

    if FUSE_O:  # Q h_t and Q K^T, accumulated over the K tiles
        b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, 0, C, BK, OP)
        b_o = tl.dot(b_q, b_h0.to(OP), input_precision=DOT_PREC)
        b_A = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
        if NK > 1:
            b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, BK, C, BK, OP)
            b_o = tl.dot(b_q, b_h1.to(OP), b_o, input_precision=DOT_PREC, out_dtype=ACC)
            b_A = tl.dot(b_q, tl.trans(b_k), b_A, input_precision=DOT_PREC, out_dtype=ACC)
        if NK > 2:
            b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, 2 * BK, C, BK, OP)
            b_o = tl.dot(b_q, b_h2.to(OP), b_o, input_precision=DOT_PREC, out_dtype=ACC)
            b_A = tl.dot(b_q, tl.trans(b_k), b_A, input_precision=DOT_PREC, out_dtype=ACC)
        if NK > 3:
            b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, 3 * BK, C, BK, OP)
            b_o = tl.dot(b_q, b_h3.to(OP), b_o, input_precision=DOT_PREC, out_dtype=ACC)
            b_A = tl.dot(b_q, tl.trans(b_k), b_A, input_precision=DOT_PREC, out_dtype=ACC)
        rows = tl.arange(0, C)[:, None]
        cols = tl.arange(0, C)[None, :]
        b_A = tl.where(rows >= cols, b_A, 0.0).to(OP)

    # v_new = U - W h, with W h accumulated in place over the K tiles (from -U unless DOT_FIRST)
    if DOT_FIRST:
        b_wh = tl.zeros([C, BV], dtype=b_h0.dtype)
    else:
        b_wh = -tl.load(_tok(u, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(b_h0.dtype)
    b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(OP)
    b_wh = tl.dot(b_w, b_h0.to(OP), b_wh, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 1:
        b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_wh = tl.dot(b_w, b_h1.to(OP), b_wh, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 2:
        b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, 2 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_wh = tl.dot(b_w, b_h2.to(OP), b_wh, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 3:
        b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, 3 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_wh = tl.dot(b_w, b_h3.to(OP), b_wh, input_precision=DOT_PREC, out_dtype=ACC)
    if DOT_FIRST:
        b_v = tl.load(_tok(u, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(b_h0.dtype) - b_wh
    else:
        b_v = -b_wh
    tl.store(_tok(v_new, bos, i_h, L, H, V, t * C, v0, C, BV), b_v.to(v_new.dtype.element_ty), boundary_check=(0, 1))
    b_v = b_v.to(OP)
    if FUSE_O:
        b_o = tl.dot(b_A, b_v, b_o, input_precision=DOT_PREC, out_dtype=ACC) * scale
        p_o = _tok(o, bos, i_h, L, H, V, t * C, v0, C, BV)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), boundary_check=(0, 1))

    # h += K^T v_new
    b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(OP)
    b_h0 = tl.dot(tl.trans(b_k), b_v, b_h0, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 1:
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h1 = tl.dot(tl.trans(b_k), b_v, b_h1, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 2:
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, 2 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h2 = tl.dot(tl.trans(b_k), b_v, b_h2, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 3:
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, 3 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h3 = tl.dot(tl.trans(b_k), b_v, b_h3, input_precision=DOT_PREC, out_dtype=ACC)
    return b_h0, b_h1, b_h2, b_h3


@triton.jit
def chunk_h_fwd_kernel(q, k, w, u, h, v_new, o, h0, ht, offsets, chunk_offsets, scale_ptr,
                       H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                       USE_S0: tl.constexpr, STORE_FINAL: tl.constexpr, DOT_PREC: tl.constexpr,
                       WHILE_LOOP: tl.constexpr, OP: tl.constexpr, ACC: tl.constexpr, DOT_FIRST: tl.constexpr,
                       FUSE_O: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    v0 = i_v * BV
    scale = 1.0
    if FUSE_O:
        scale = tl.load(scale_ptr)

    b_h0 = tl.zeros([BK, BV], dtype=ACC)
    b_h1 = tl.zeros([BK, BV], dtype=ACC)
    b_h2 = tl.zeros([BK, BV], dtype=ACC)
    b_h3 = tl.zeros([BK, BV], dtype=ACC)
    if USE_S0:
        p0 = h0 + i_n.to(tl.int64) * H * K * V
        b_h0 += tl.load(_st(p0, i_h, H, K, V, 0, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
        if NK > 1:
            b_h1 += tl.load(_st(p0, i_h, H, K, V, BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
        if NK > 2:
            b_h2 += tl.load(_st(p0, i_h, H, K, V, 2 * BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
        if NK > 3:
            b_h3 += tl.load(_st(p0, i_h, H, K, V, 3 * BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)

    NT = tl.cdiv(L, C).to(tl.int32)
    if WHILE_LOOP:  # the interpreter cannot range() over a loaded bound
        t = 0
        while t < NT:
            b_h0, b_h1, b_h2, b_h3 = _fwd_step(t, b_h0, b_h1, b_h2, b_h3, q, k, w, u, h, v_new, o, scale, bos, i_h,
                                               L, c0, v0, H, K, V, C, BK, BV, NK, DOT_PREC, OP, DOT_FIRST, FUSE_O)
            t += 1
    else:
        for t in range(NT):
            b_h0, b_h1, b_h2, b_h3 = _fwd_step(t, b_h0, b_h1, b_h2, b_h3, q, k, w, u, h, v_new, o, scale, bos, i_h,
                                               L, c0, v0, H, K, V, C, BK, BV, NK, DOT_PREC, OP, DOT_FIRST, FUSE_O)

    if STORE_FINAL:
        pt = ht + i_n.to(tl.int64) * H * K * V
        tl.store(_st(pt, i_h, H, K, V, 0, v0, BK, BV), b_h0, boundary_check=(0, 1))
        if NK > 1:
            tl.store(_st(pt, i_h, H, K, V, BK, v0, BK, BV), b_h1, boundary_check=(0, 1))
        if NK > 2:
            tl.store(_st(pt, i_h, H, K, V, 2 * BK, v0, BK, BV), b_h2, boundary_check=(0, 1))
        if NK > 3:
            tl.store(_st(pt, i_h, H, K, V, 3 * BK, v0, BK, BV), b_h3, boundary_check=(0, 1))


@triton.jit
def _bwd_step(t, b_h0, b_h1, b_h2, b_h3, q, k, w, do, dv_local, dh, dv_new, scale, bos, i_h, L, c0, v0,
              H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr,
              DOT_FIRST: tl.constexpr, FUSE_DV: tl.constexpr):
    """Chunk t (reverse order): store dh_{t+1}; dv_new = dv_local + K dh; dh_t = dh + scale Q^T dO - W^T dv_new
    (dot operands K, dh, Q, scale dO, W, dv_new in OP). DOT_FIRST: K dh summed from zero, dv_local added after.
    FUSE_DV: dv_local = (K Q^T * M^T) (scale dO) computed here (chunk_dv_local's, operands in OP), not loaded."""
    ACC = b_h0.dtype
    ph = dh + (c0 + t) * H * K * V
    tl.store(_st(ph, i_h, H, K, V, 0, v0, BK, BV), b_h0.to(ph.dtype.element_ty), boundary_check=(0, 1))
    if NK > 1:
        tl.store(_st(ph, i_h, H, K, V, BK, v0, BK, BV), b_h1.to(ph.dtype.element_ty), boundary_check=(0, 1))
    if NK > 2:
        tl.store(_st(ph, i_h, H, K, V, 2 * BK, v0, BK, BV), b_h2.to(ph.dtype.element_ty), boundary_check=(0, 1))
    if NK > 3:
        tl.store(_st(ph, i_h, H, K, V, 3 * BK, v0, BK, BV), b_h3.to(ph.dtype.element_ty), boundary_check=(0, 1))

    b_do = (tl.load(_tok(do, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC) * scale).to(OP)
    # dv_new = dv_local + K dh, accumulated in place over the K tiles (from zero when DOT_FIRST)
    if FUSE_DV:  # dv_local = (K Q^T * M^T) (scale dO), K Q^T accumulated over the K tiles
        b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, 0, C, BK, OP)
        b_At = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC)
        if NK > 1:
            b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, BK, C, BK, OP)
            b_At = tl.dot(b_k, tl.trans(b_q), b_At, input_precision=DOT_PREC, out_dtype=ACC)
        if NK > 2:
            b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, 2 * BK, C, BK, OP)
            b_At = tl.dot(b_k, tl.trans(b_q), b_At, input_precision=DOT_PREC, out_dtype=ACC)
        if NK > 3:
            b_q, b_k = _qk(q, k, bos, i_h, L, H, K, t * C, 3 * BK, C, BK, OP)
            b_At = tl.dot(b_k, tl.trans(b_q), b_At, input_precision=DOT_PREC, out_dtype=ACC)
        rows = tl.arange(0, C)[:, None]
        cols = tl.arange(0, C)[None, :]
        b_dv = tl.dot(tl.where(rows <= cols, b_At, 0.0).to(OP), b_do, input_precision=DOT_PREC, out_dtype=ACC)
    elif DOT_FIRST:
        b_dv = tl.zeros([C, BV], dtype=ACC)
    else:
        b_dv = tl.load(_tok(dv_local, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
    b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(OP)
    b_dv = tl.dot(b_k, b_h0.to(OP), b_dv, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 1:
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_dv = tl.dot(b_k, b_h1.to(OP), b_dv, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 2:
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, 2 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_dv = tl.dot(b_k, b_h2.to(OP), b_dv, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 3:
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, t * C, 3 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_dv = tl.dot(b_k, b_h3.to(OP), b_dv, input_precision=DOT_PREC, out_dtype=ACC)
    if DOT_FIRST and not FUSE_DV:
        b_dv += tl.load(_tok(dv_local, bos, i_h, L, H, V, t * C, v0, C, BV), boundary_check=(0, 1)).to(ACC)
    tl.store(_tok(dv_new, bos, i_h, L, H, V, t * C, v0, C, BV), b_dv.to(dv_new.dtype.element_ty),
             boundary_check=(0, 1))
    b_dvn = (-b_dv).to(OP)  # -dv_new: dh accumulates W^T (-dv_new) in place

    # dh += scale Q^T dO + W^T (-dv_new), each product accumulated into the state tile
    b_q = tl.load(_tok(q, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(OP)
    b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, 0, C, BK), boundary_check=(0, 1)).to(OP)
    b_h0 = tl.dot(tl.trans(b_q), b_do, b_h0, input_precision=DOT_PREC, out_dtype=ACC)
    b_h0 = tl.dot(tl.trans(b_w), b_dvn, b_h0, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 1:
        b_q = tl.load(_tok(q, bos, i_h, L, H, K, t * C, BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h1 = tl.dot(tl.trans(b_q), b_do, b_h1, input_precision=DOT_PREC, out_dtype=ACC)
        b_h1 = tl.dot(tl.trans(b_w), b_dvn, b_h1, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 2:
        b_q = tl.load(_tok(q, bos, i_h, L, H, K, t * C, 2 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, 2 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h2 = tl.dot(tl.trans(b_q), b_do, b_h2, input_precision=DOT_PREC, out_dtype=ACC)
        b_h2 = tl.dot(tl.trans(b_w), b_dvn, b_h2, input_precision=DOT_PREC, out_dtype=ACC)
    if NK > 3:
        b_q = tl.load(_tok(q, bos, i_h, L, H, K, t * C, 3 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_w = tl.load(_tok(w, bos, i_h, L, H, K, t * C, 3 * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h3 = tl.dot(tl.trans(b_q), b_do, b_h3, input_precision=DOT_PREC, out_dtype=ACC)
        b_h3 = tl.dot(tl.trans(b_w), b_dvn, b_h3, input_precision=DOT_PREC, out_dtype=ACC)
    return b_h0, b_h1, b_h2, b_h3


@triton.jit
def chunk_h_bwd_kernel(q, k, w, do, dv_local, dh, dv_new, dht, ds0, offsets, chunk_offsets, scale_ptr,
                       H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr,
                       USE_DHT: tl.constexpr, STORE_DS0: tl.constexpr, DOT_PREC: tl.constexpr,
                       WHILE_LOOP: tl.constexpr, OP: tl.constexpr, DOT_FIRST: tl.constexpr, FUSE_DV: tl.constexpr):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)
    ACC = scale_ptr.dtype.element_ty
    v0 = i_v * BV
    NT = tl.cdiv(L, C).to(tl.int32)
    scale = tl.load(scale_ptr)

    b_h0 = tl.zeros([BK, BV], dtype=ACC)
    b_h1 = tl.zeros([BK, BV], dtype=ACC)
    b_h2 = tl.zeros([BK, BV], dtype=ACC)
    b_h3 = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        pt = dht + i_n.to(tl.int64) * H * K * V
        b_h0 += tl.load(_st(pt, i_h, H, K, V, 0, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
        if NK > 1:
            b_h1 += tl.load(_st(pt, i_h, H, K, V, BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
        if NK > 2:
            b_h2 += tl.load(_st(pt, i_h, H, K, V, 2 * BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)
        if NK > 3:
            b_h3 += tl.load(_st(pt, i_h, H, K, V, 3 * BK, v0, BK, BV), boundary_check=(0, 1)).to(ACC)

    if WHILE_LOOP:  # the interpreter cannot range() over a loaded bound
        t = NT - 1
        while t >= 0:
            b_h0, b_h1, b_h2, b_h3 = _bwd_step(t, b_h0, b_h1, b_h2, b_h3, q, k, w, do, dv_local, dh, dv_new, scale,
                                               bos, i_h, L, c0, v0, H, K, V, C, BK, BV, NK, DOT_PREC, OP, DOT_FIRST,
                                               FUSE_DV)
            t -= 1
    else:
        for s in range(NT):
            b_h0, b_h1, b_h2, b_h3 = _bwd_step(NT - 1 - s, b_h0, b_h1, b_h2, b_h3, q, k, w, do, dv_local, dh,
                                               dv_new, scale, bos, i_h, L, c0, v0, H, K, V, C, BK, BV, NK, DOT_PREC,
                                               OP, DOT_FIRST, FUSE_DV)

    if STORE_DS0:
        p0 = ds0 + i_n.to(tl.int64) * H * K * V
        DT = ds0.dtype.element_ty
        tl.store(_st(p0, i_h, H, K, V, 0, v0, BK, BV), b_h0.to(DT), boundary_check=(0, 1))
        if NK > 1:
            tl.store(_st(p0, i_h, H, K, V, BK, v0, BK, BV), b_h1.to(DT), boundary_check=(0, 1))
        if NK > 2:
            tl.store(_st(p0, i_h, H, K, V, 2 * BK, v0, BK, BV), b_h2.to(DT), boundary_check=(0, 1))
        if NK > 3:
            tl.store(_st(p0, i_h, H, K, V, 3 * BK, v0, BK, BV), b_h3.to(DT), boundary_check=(0, 1))


# Largest K / V tile (tests lower it to reach the multi-tile paths with small head sizes).
TILE = 64


def _blocks(K, V):
    """K in at most four tiles of BK rows; BV columns, narrower for large K to bound the register state
    (at most [256, 32] or [128, 64] fp32 per program)."""
    BK = min(TILE, block_size(K))
    while triton.cdiv(K, BK) > 4:
        BK *= 2
    NK = triton.cdiv(K, BK)
    BV = min(block_size(V), TILE if NK * BK <= 128 else max(16, TILE // 2))
    return BK, NK, BV


def chunk_h_fwd(k, w, u, initial_state, output_final_state, offsets, chunk_offsets, NC, chunk_size, q=None,
                scale_t=None):
    """Returns h [NC, H, K, V] (state entering each chunk), v_new [B, T, H, V] (both in the kernel's operand
    storage dtype), the final state [N, H, K, V] (accumulation dtype) or None, and o [B, T, H, V] in q's dtype
    (chunk_o_fwd's) when it was computed in the same pass, else None: given q and scale_t (a one-element tensor in
    the accumulation dtype), where the grid fills the GPU (more programs than SMs, so a longer chunk step hides
    behind the other programs). Where it does not (long T, small B * H: a latency-bound chain of chunks), o is left
    to chunk_o_fwd, and V is split in 32-wide blocks for twice the programs."""
    B, T, H, K = k.shape
    V = u.shape[-1]
    N, acc = offsets.numel() - 1, acc_dtype(k.dtype)
    BK, NK, BV = _blocks(K, V)
    few = few_programs(triton.cdiv(V, BV) * N * H, k.device)
    fuse_o = q is not None and not few
    split = few and BV == 64 and utils.STATE_SPLIT_V
    if split:  # (half operands as at BV = 64: the tile rule holds for C and BK, no N = 64 product precedes one
        BV = 32  # with N = 32 here; the kernel's products all have N = BV)
    op = operand_type("chunk_h_fwd", k.dtype, chunk_size, BK, *(() if split else (BV,)))
    h = new_empty((NC, H, K, V), operand_storage(op), k.device)
    v_new = new_empty((B, T, H, V), operand_storage(op), k.device)
    ht = new_empty((N, H, K, V), acc, k.device) if output_final_state else None
    o = new_empty((B, T, H, V), q.dtype, k.device) if fuse_o else None
    a, e = torch.finfo(acc).bits // 8, k.element_size()
    tiles = NK * BK * ((a + 2 * e) if fuse_o else (a + e))  # W, K (and Q) tiles of one chunk
    stages = pipeline_stages(chunk_size * (tiles + BV * a))  # and U's
    launch_fitting(
        chunk_h_fwd_kernel, (triton.cdiv(V, BV), N * H), q, k, w, u, h, v_new, o, initial_state, ht, offsets,
        chunk_offsets, scale_t, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, NK=NK, USE_S0=initial_state is not None,
        STORE_FINAL=output_final_state, DOT_PREC=dot_precision(k.dtype), WHILE_LOOP=interpreting(),
        OP=op, ACC=tl_acc(k.dtype), DOT_FIRST=utils.STATE_DOT_FIRST, FUSE_O=fuse_o, stages=(stages,))
    return h, v_new, ht, o


def chunk_h_bwd(q, k, w, do, dv_local, dht, initial_state, scale_t, offsets, chunk_offsets, NC, chunk_size,
                dv_new_dtype=None):
    """Returns dh [NC, H, K, V] (gradient of the state leaving each chunk; operand storage dtype), dv_new
    [B, T, H, V] in dv_new_dtype (default: the accumulation dtype) and dS0 [N, H, K, V] in initial_state's dtype
    (None without initial_state). dv_local None: computed in the same pass (chunk_dv_local's)."""
    B, T, H, K = k.shape
    V = do.shape[-1]
    N, acc = offsets.numel() - 1, acc_dtype(k.dtype)
    BK, NK, BV = _blocks(K, V)
    op = operand_type("chunk_h_bwd", k.dtype, chunk_size, BK, BV)
    dh = new_empty((NC, H, K, V), operand_storage(op), k.device)
    dv_new = new_empty((B, T, H, V), dv_new_dtype or acc, k.device)
    ds0 = None if initial_state is None else new_empty((N, H, K, V), initial_state.dtype, k.device)
    a, e = torch.finfo(acc).bits // 8, k.element_size()
    dv_bytes = 0 if dv_local is None else a
    stages = (pipeline_stages(chunk_size * (NK * BK * (2 * e + a) + BV * (dv_bytes + e))),)  # K, Q, W, dv_local, dO
    if utils.STATE_PIPELINE and few_programs(triton.cdiv(V, BV) * N * H, k.device):
        stages = (2, 1)  # (utils.STATE_PIPELINE: latency-bound with one program per SM)
    launch_fitting(
        chunk_h_bwd_kernel, (triton.cdiv(V, BV), N * H), q, k, w, do, dv_local, dh, dv_new, dht, ds0, offsets,
        chunk_offsets, scale_t, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, NK=NK, USE_DHT=dht is not None,
        STORE_DS0=ds0 is not None, DOT_PREC=dot_precision(k.dtype), WHILE_LOOP=interpreting(),
        OP=op, DOT_FIRST=utils.STATE_DOT_FIRST, FUSE_DV=dv_local is None, stages=stages)
    return dh, dv_new, ds0
