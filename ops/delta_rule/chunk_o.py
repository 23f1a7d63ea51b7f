"""Per-chunk outputs of the chunked delta rule and the backward pieces that are parallel over chunks.

With h_n the state entering chunk n, v_new_n = U_n - W_n h_n, dh_{n+1} the gradient of the state leaving it,
dv_new_n its v_new gradient (chunk_h) and M the inclusive causal mask (i >= j):
    forward          O = scale (Q h_n + (Q K^T * M) v_new)
    dv_local         scale (Q K^T * M)^T dO                          (the intra-chunk part of dv_new)
    dq, dk, dw       dQ = scale dO h_n^T + scale (dO v_new^T * M) K
                     dK = scale (dO v_new^T * M)^T Q + v_new dh_{n+1}^T      (WY terms added by wy_bwd)
                     dW = -dv_new h_n^T
Grids: (V blocks, NC, H) for O and dv_local, (K blocks, NC, H) for dq/dk/dw, each looping over the other axis.
"""
import torch
import triton
import triton.language as tl

from ops.common import utils
from ops.common.utils import (
    acc_dtype,
    block_size,
    dot_precision,
    launch_fitting,
    new_empty,
    operand_type,
    pipeline_stages,
    sum_storage,
)
from ops.delta_rule.chunk_h import _st, _tok


@triton.jit
def chunk_o_fwd_kernel(q, k, v_new, h, o, scale_ptr, offsets, cmap,
                       H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """O = scale (Q h_n + (Q K^T * M) v_new); dot operands Q, K, h, the masked Q K^T and v_new in OP."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = scale_ptr.dtype.element_ty
    scale = tl.load(scale_ptr)
    ph = h + i_c.to(tl.int64) * H * K * V

    b_o = tl.zeros([C, BV], dtype=ACC)
    b_A = tl.zeros([C, C], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        b_q = tl.load(_tok(q, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_h = tl.load(_st(ph, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV), boundary_check=(0, 1)).to(OP)
        b_o += tl.dot(b_q, b_h, input_precision=DOT_PREC)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)
    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, C)[None, :]
    b_A = tl.where(rows >= cols, b_A, 0.0).to(OP)
    b_v = tl.load(_tok(v_new, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
    b_o = (b_o + tl.dot(b_A, b_v, input_precision=DOT_PREC)) * scale
    p_o = _tok(o, bos, i_h, L, H, V, j * C, i_v * BV, C, BV)
    tl.store(p_o, b_o.to(p_o.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_dv_local_kernel(q, k, do, dv, scale_ptr, offsets, cmap,
                          H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """dv_local = scale (Q K^T * M)^T dO, as (K Q^T * M^T) dO; dot operands in OP."""
    i_v, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = scale_ptr.dtype.element_ty
    scale = tl.load(scale_ptr)

    b_At = tl.zeros([C, C], dtype=ACC)  # (Q K^T)^T = K Q^T
    for i_k in range(tl.cdiv(K, BK)):
        b_q = tl.load(_tok(q, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_k = tl.load(_tok(k, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
        b_At += tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PREC)
    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, C)[None, :]
    b_At = (tl.where(rows <= cols, b_At, 0.0) * scale).to(OP)
    b_do = tl.load(_tok(do, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
    p_dv = _tok(dv, bos, i_h, L, H, V, j * C, i_v * BV, C, BV)
    tl.store(p_dv, tl.dot(b_At, b_do, input_precision=DOT_PREC).to(p_dv.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def chunk_o_bwd_kernel(q, k, v_new, h, do, dh, dv_new, dq, dk, dw, scale_ptr, offsets, cmap,
                       H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr,
                       QT_DS: tl.constexpr):
    """dQ, dK (partial), dW of the module docstring. The products over V take OP operands; dS^T Q takes ACC
    ones: a transposed dot result rounded to half and fed to tl.dot miscompiles on Hopper (fla PR 826). QT_DS
    (utils.QT_DS): dS^T Q as (Q^T dS)^T instead, OP operands, the transpose on the product."""
    i_k, i_c, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = scale_ptr.dtype.element_ty
    scale = tl.load(scale_ptr)
    ph = h + i_c.to(tl.int64) * H * K * V
    pdh = dh + i_c.to(tl.int64) * H * K * V

    b_dS = tl.zeros([C, C], dtype=ACC)   # dO v_new^T
    b_dq = tl.zeros([C, BK], dtype=ACC)  # dO h^T
    b_dk = tl.zeros([C, BK], dtype=ACC)  # v_new dh^T
    b_dw = tl.zeros([C, BK], dtype=ACC)  # dv_new h^T (dW = -dv_new h^T: negated when stored)
    for i_v in range(tl.cdiv(V, BV)):
        b_do = tl.load(_tok(do, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_v = tl.load(_tok(v_new, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_dv = tl.load(_tok(dv_new, bos, i_h, L, H, V, j * C, i_v * BV, C, BV), boundary_check=(0, 1)).to(OP)
        b_ht = tl.trans(tl.load(_st(ph, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV), boundary_check=(0, 1)).to(OP))
        b_dht = tl.trans(tl.load(_st(pdh, i_h, H, K, V, i_k * BK, i_v * BV, BK, BV), boundary_check=(0, 1)).to(OP))
        b_dS += tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PREC)
        b_dq += tl.dot(b_do, b_ht, input_precision=DOT_PREC)
        b_dk += tl.dot(b_v, b_dht, input_precision=DOT_PREC)
        b_dw += tl.dot(b_dv, b_ht, input_precision=DOT_PREC)
    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, C)[None, :]
    b_dS = tl.where(rows >= cols, b_dS, 0.0) * scale
    b_q = tl.load(_tok(q, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1))
    b_k = tl.load(_tok(k, bos, i_h, L, H, K, j * C, i_k * BK, C, BK), boundary_check=(0, 1)).to(OP)
    b_dq = b_dq * scale + tl.dot(b_dS.to(OP), b_k, input_precision=DOT_PREC)
    if QT_DS:  # dS^T Q = (Q^T dS)^T: half operands, neither of them a transposed dot result
        b_dk += tl.trans(tl.dot(tl.trans(b_q.to(OP)), b_dS.to(OP), input_precision=DOT_PREC))
    else:
        b_dk += tl.dot(tl.trans(b_dS), b_q.to(ACC), input_precision=DOT_PREC)
    p_dq = _tok(dq, bos, i_h, L, H, K, j * C, i_k * BK, C, BK)
    tl.store(p_dq, b_dq.to(p_dq.dtype.element_ty), boundary_check=(0, 1))
    p_dk = _tok(dk, bos, i_h, L, H, K, j * C, i_k * BK, C, BK)
    tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))
    p_dw = _tok(dw, bos, i_h, L, H, K, j * C, i_k * BK, C, BK)
    tl.store(p_dw, (-b_dw).to(p_dw.dtype.element_ty), boundary_check=(0, 1))


# Largest K / V tile (tests lower it to reach the multi-tile loops with small head sizes).
TILE = 64


def _blocks(K, V):
    return min(TILE, block_size(K)), min(TILE, block_size(V))


def _bytes(dtype):
    return torch.finfo(dtype).bits // 8


def chunk_o_fwd(q, k, v_new, h, scale_t, offsets, cmap, chunk_size):
    """o [B, T, H, V] in q's dtype; scale_t a one-element tensor in the accumulation dtype."""
    B, T, H, K = q.shape
    V = v_new.shape[-1]
    NC = cmap.shape[0]
    o = new_empty((B, T, H, V), q.dtype, q.device)
    if NC:
        BK, BV = _blocks(K, V)
        stages = pipeline_stages(2 * chunk_size * BK * q.element_size() + BK * BV * _bytes(h.dtype))  # Q, K, h
        launch_fitting(
            chunk_o_fwd_kernel, (triton.cdiv(V, BV), NC, H), q, k, v_new, h, o, scale_t, offsets, cmap, H=H, K=K, V=V,
            C=chunk_size, BK=BK, BV=BV, DOT_PREC=dot_precision(q.dtype),
            OP=operand_type("chunk_o_fwd", q.dtype, chunk_size, BK, BV), stages=(stages,))
    return o


def chunk_dv_local(q, k, do, scale_t, offsets, cmap, chunk_size):
    """scale (Q K^T * M)^T dO per chunk, [B, T, H, V] in utils.sum_storage of its operand type (chunk_h_bwd adds
    to it)."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    NC = cmap.shape[0]
    BK, BV = _blocks(K, V)
    op = operand_type("chunk_dv_local", q.dtype, chunk_size, BK, BV)
    dv = new_empty((B, T, H, V), sum_storage(op), q.device)
    if NC:
        stages = pipeline_stages(2 * chunk_size * BK * q.element_size())  # Q, K
        launch_fitting(
            chunk_dv_local_kernel, (triton.cdiv(V, BV), NC, H), q, k, do, dv, scale_t, offsets, cmap, H=H, K=K, V=V,
            C=chunk_size, BK=BK, BV=BV, DOT_PREC=dot_precision(q.dtype), OP=op, stages=(stages,))
    return dv


def _bwd_blocks(K, V, dtype):
    BK, BV = _blocks(K, V)
    return BK, (min(BV, 32) if dtype == torch.float64 else BV)


def bwd_operands(dtype, chunk_size, K, V):
    """chunk_o_bwd_kernel's dot operand type (the one v_new, dv_new, h and dh are rounded to when read)."""
    return operand_type("chunk_o_bwd", dtype, chunk_size, *_bwd_blocks(K, V, dtype))


def chunk_o_bwd(q, k, v_new, h, do, dh, dv_new, scale_t, offsets, cmap, chunk_size, dw_dtype=None):
    """Returns dq (q's dtype), the partial dk (utils.sum_storage of the operand type: wy_bwd adds to it) and dw
    (dw_dtype, default the accumulation dtype), all [B, T, H, K]."""
    B, T, H, K = q.shape
    V = do.shape[-1]
    NC, acc = cmap.shape[0], acc_dtype(q.dtype)
    BK, BV = _bwd_blocks(K, V, q.dtype)
    op = bwd_operands(q.dtype, chunk_size, K, V)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk = new_empty(q.shape, sum_storage(op), q.device)
    dw = new_empty(q.shape, dw_dtype or acc, q.device)
    if NC:
        a = _bytes(acc)
        stages = pipeline_stages(chunk_size * BV * (do.element_size() + 2 * a) + 2 * BK * BV * a)  # dO v v' h dh
        launch_fitting(
            chunk_o_bwd_kernel, (triton.cdiv(K, BK), NC, H), q, k, v_new, h, do, dh, dv_new, dq, dk, dw, scale_t,
            offsets, cmap, H=H, K=K, V=V, C=chunk_size, BK=BK, BV=BV, DOT_PREC=dot_precision(q.dtype), OP=op,
            QT_DS=utils.QT_DS, stages=(stages,))
    return dq, dk, dw

