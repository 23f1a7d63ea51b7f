"""Causal softmax attention (flash-attention style: online softmax, no T x T matrix in HBM), forward and backward.

Per sequence and head, with logits S = scale Q K^T, M the inclusive causal mask and lse_i = log sum_{j<=i} e^{S_ij}:

    A = exp(S - lse) * M,   o = A V.
    backward:  dV = A^T dO,   D_i = dO_i . o_i,   dS = A * (dO V^T - D),   dQ = scale dS K,   dK = scale dS^T Q.

The backward kernels can also add the adjoint of a second, strictly causal softmax over the same logits
(the DeltaFormer solve's P = exp(S - lse_s) * M_strict, see ops/deltaformer/parallel.py): with w = P U its output,
dw = -diag(b) G its upstream gradient and D_s = dw . w its row terms,

    dS += P * (dw U^T - D_s),    dbeta_i = -(P * (G U^T))_i summed over the row  (= -g_i . w_i).

Both terms share every logits tile S. Tensors are addressed as [tokens, H, D], tokens the flattened B*T axis;
`offsets` (int32 [N + 1]) gives each sequence's token range and `chunks` (int32 [NC, 2]) every (sequence, block)
pair of C rows, so blocks never cross sequences. Head dimensions are processed in column chunks of BK (K) and
BV (V); a program owns one chunk of its output columns and recomputes S over all of K.
"""
import torch
import triton
import triton.language as tl

from ops.common.compile_ahead import first_call
from ops.common.utils import (
    acc_dtype,
    block_size,
    check_cu_seqlens,
    check_qkv,
    chunk_index,
    default_scale,
    dot_precision,
    new_empty,
    quadratic_block_rows,
    scale_arg,
    tl_acc,
)

NUM_WARPS = 4
MAX_TILE = 64  # widest K / V column chunk of a tile (tests shrink it to reach the multi-chunk paths)


def check_chunk_size(chunk_size, K: int, V: int) -> int:
    if chunk_size is None:
        return quadratic_block_rows(K, V)
    if not isinstance(chunk_size, int) or chunk_size not in (16, 32, 64, 128):
        raise ValueError(f"chunk_size must be one of 16, 32, 64, 128, got {chunk_size}")
    return chunk_size


def meta(dtype, K: int, V: int, C: int) -> dict:
    """Compile-time tile parameters shared by every DeltaFormer kernel."""
    return dict(K=K, V=V, C=C, BK=min(MAX_TILE, block_size(K)), BV=min(MAX_TILE, block_size(V)),
                ACC=tl_acc(dtype), DOT_PREC=dot_precision(dtype), num_warps=NUM_WARPS)




# ---------------------------------------------------------------- tile helpers (shared with invcum.py)

@triton.jit
def load_tile(ptr, rows, row_mask, H, i_h, D: tl.constexpr, cols, ACC: tl.constexpr):
    """x[rows, i_h, cols] of a [tokens, H, D] tensor, upcast to ACC; zero outside the rows and columns."""
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    return tl.load(p, mask=row_mask[:, None] & (cols[None, :] < D), other=0).to(ACC)


@triton.jit
def load_own_tile(ptr, rows, row_mask, H, i_h, D: tl.constexpr, cols, ACC: tl.constexpr):
    """load_tile for rows this program stored earlier (after a barrier): bypass L1 (.cg) to read them from L2."""
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    return tl.load(p, mask=row_mask[:, None] & (cols[None, :] < D), other=0, cache_modifier=".cg").to(ACC)


@triton.jit
def store_tile(ptr, x, rows, row_mask, H, i_h, D: tl.constexpr, cols):
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    tl.store(p, x.to(ptr.dtype.element_ty), mask=row_mask[:, None] & (cols[None, :] < D))


@triton.jit
def load_vec(ptr, rows, row_mask, H, i_h, ACC: tl.constexpr):
    """x[rows, i_h] of a [tokens, H] tensor, upcast to ACC; zero outside the rows."""
    return tl.load(ptr + rows * H + i_h, mask=row_mask, other=0).to(ACC)


@triton.jit
def logits(q, rows_i, m_i, k, rows_j, m_j, scale, H, i_h, K: tl.constexpr,
           C: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """S = scale Q[rows_i] K[rows_j]^T ([C, C]), summed over K in chunks of BK."""
    s = tl.zeros([C, C], dtype=ACC)
    for k0 in tl.static_range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        a = load_tile(q, rows_i, m_i, H, i_h, K, cols, ACC)
        b = load_tile(k, rows_j, m_j, H, i_h, K, cols, ACC)
        s += tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    return s * scale


@triton.jit
def block_rows(offsets, chunks, i_c, C: tl.constexpr):
    """(bos, eos, block index c) of the (sequence, block) pair i_c."""
    i_n = tl.load(chunks + 2 * i_c).to(tl.int64)
    c = tl.load(chunks + 2 * i_c + 1).to(tl.int64)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    return bos, eos, c


# ---------------------------------------------------------------- forward

@triton.jit
def attn_fwd_kernel(q, k, v, o, lse, offsets, chunks, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """o_i = sum_{j<=i} softmax_j(S_ij) v_j for query block i by online softmax over key blocks j <= i (running
    max m, normalizer l, rescaled accumulator); lse_i = m_i + log l_i. Grid (NC, H, cdiv(V, BV))."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)
    bos, eos, c = block_rows(offsets, chunks, i_c, C)
    idx = tl.arange(0, C)
    vc = i_v * BV + tl.arange(0, BV)
    rows_i = bos + c * C + idx
    m_i = rows_i < eos
    m = tl.full([C], float("-inf"), dtype=ACC)
    l = tl.zeros([C], dtype=ACC)
    acc = tl.zeros([C, BV], dtype=ACC)
    j = 0
    while j <= c:
        rows_j = bos + j * C + idx
        m_j = rows_j < eos
        s = logits(q, rows_i, m_i, k, rows_j, m_j, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
        s = tl.where((rows_i[:, None] >= rows_j[None, :]) & m_j[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked (padding) rows: no inf - inf
        alpha = tl.exp(m - m_use)
        p = tl.exp(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p, load_tile(v, rows_j, m_j, H, i_h, V, vc, ACC), input_precision=DOT_PREC)
        m = m_new
        j += 1
    l_use = tl.where(l > 0, l, 1.0)
    store_tile(o, acc / l_use[:, None], rows_i, m_i, H, i_h, V, vc)
    if i_v == 0:
        tl.store(lse + rows_i * H + i_h, (m + tl.log(l_use)).to(lse.dtype.element_ty), mask=m_i)


# ---------------------------------------------------------------- backward

@triton.jit
def row_terms_kernel(do, o, g, v, u, beta, delta, delta_s, offsets, chunks, H, V: tl.constexpr,
                     C: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, HAS_STRICT: tl.constexpr):
    """D_i = dO_i . o_i; with HAS_STRICT also D_s_i = -g_i . (v_i - u_i) (= dw_i . w_i, since b_i w_i = v_i - u_i),
    zero on each sequence's first token (its w is an empty sum). Grid (NC, H)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    bos, eos, c = block_rows(offsets, chunks, i_c, C)
    rows = bos + c * C + tl.arange(0, C)
    msk = rows < eos
    d = tl.zeros([C], dtype=ACC)
    ds = tl.zeros([C], dtype=ACC)
    for v0 in tl.static_range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        d += tl.sum(load_tile(do, rows, msk, H, i_h, V, vc, ACC) * load_tile(o, rows, msk, H, i_h, V, vc, ACC), 1)
        if HAS_STRICT:
            vu = load_tile(v, rows, msk, H, i_h, V, vc, ACC) - load_tile(u, rows, msk, H, i_h, V, vc, ACC)
            ds -= tl.sum(load_tile(g, rows, msk, H, i_h, V, vc, ACC) * vu, 1)
    tl.store(delta + rows * H + i_h, d.to(delta.dtype.element_ty), mask=msk)
    if HAS_STRICT:
        tl.store(delta_s + rows * H + i_h, tl.where(rows > bos, ds, 0.0).to(delta_s.dtype.element_ty), mask=msk)


@triton.jit
def attn_bwd_dv_kernel(q, k, do, lse, dv, offsets, chunks, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """dV_j = sum_{i>=j} A_ij^T dO_i for key block j, A_ij = exp(S_ij - lse_i) * M. Grid (NC, H, cdiv(V, BV))."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)
    bos, eos, c = block_rows(offsets, chunks, i_c, C)
    idx = tl.arange(0, C)
    vc = i_v * BV + tl.arange(0, BV)
    rows_j = bos + c * C + idx
    m_j = rows_j < eos
    acc = tl.zeros([C, BV], dtype=ACC)
    nb = tl.cdiv(eos - bos, C)
    i = c
    while i < nb:
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        s = logits(q, rows_i, m_i, k, rows_j, m_j, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
        lse_i = load_vec(lse, rows_i, m_i, H, i_h, ACC)
        a = tl.where((rows_i[:, None] >= rows_j[None, :]) & m_i[:, None], tl.exp(s - lse_i[:, None]), 0.0)
        acc += tl.dot(tl.trans(a), load_tile(do, rows_i, m_i, H, i_h, V, vc, ACC), input_precision=DOT_PREC)
        i += 1
    store_tile(dv, acc, rows_j, m_j, H, i_h, V, vc)


@triton.jit
def _dlogits(q, k, v, do, lse, delta, g, beta, lse_s, delta_s, rows_i, m_i, rows_j, m_j, bos, scale, H, i_h,
             K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             ACC: tl.constexpr, DOT_PREC: tl.constexpr, HAS_STRICT: tl.constexpr):
    """(dS_ij tile, row sums of P * (G U^T) for dbeta) for query rows_i and key rows_j:
    dS = A * (dO V^T - D) [+ P * (-diag(b) G V^T - D_s)] (V is U for the DeltaFormer)."""
    s = logits(q, rows_i, m_i, k, rows_j, m_j, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
    incl = (rows_i[:, None] >= rows_j[None, :]) & m_i[:, None] & m_j[None, :]
    dp = tl.zeros([C, C], dtype=ACC)
    gu = tl.zeros([C, C], dtype=ACC)
    for v0 in tl.static_range(0, V, BV):
        vc = v0 + tl.arange(0, BV)
        v_j = tl.trans(load_tile(v, rows_j, m_j, H, i_h, V, vc, ACC))
        dp += tl.dot(load_tile(do, rows_i, m_i, H, i_h, V, vc, ACC), v_j, input_precision=DOT_PREC)
        if HAS_STRICT:
            gu += tl.dot(load_tile(g, rows_i, m_i, H, i_h, V, vc, ACC), v_j, input_precision=DOT_PREC)
    lse_i = load_vec(lse, rows_i, m_i, H, i_h, ACC)
    d_i = load_vec(delta, rows_i, m_i, H, i_h, ACC)
    ds = tl.where(incl, tl.exp(s - lse_i[:, None]) * (dp - d_i[:, None]), 0.0)
    db = tl.zeros([C], dtype=ACC)
    if HAS_STRICT:
        strict = incl & (rows_i[:, None] > rows_j[None, :])
        b_i = load_vec(beta, rows_i, m_i & (rows_i > bos), H, i_h, ACC)
        p = tl.where(strict, tl.exp(s - load_vec(lse_s, rows_i, m_i, H, i_h, ACC)[:, None]), 0.0)
        ds_i = load_vec(delta_s, rows_i, m_i, H, i_h, ACC)
        ds += tl.where(strict, p * (-b_i[:, None] * gu - ds_i[:, None]), 0.0)
        db = tl.sum(tl.where(strict, p * gu, 0.0), 1)
    return ds, db


@triton.jit
def attn_bwd_dq_kernel(q, k, v, do, lse, delta, g, beta, lse_s, delta_s, dq, dbeta, offsets, chunks, scale_ptr, H,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       ACC: tl.constexpr, DOT_PREC: tl.constexpr, HAS_STRICT: tl.constexpr):
    """dQ_i = scale sum_{j<=i} dS_ij K_j for query block i (K columns of chunk i_k); with HAS_STRICT also
    dbeta_i = -sum_{j<i} P_ij g_i . u_j. Grid (NC, H, cdiv(K, BK))."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)
    bos, eos, c = block_rows(offsets, chunks, i_c, C)
    idx = tl.arange(0, C)
    kc = i_k * BK + tl.arange(0, BK)
    rows_i = bos + c * C + idx
    m_i = rows_i < eos
    acc = tl.zeros([C, BK], dtype=ACC)
    db = tl.zeros([C], dtype=ACC)
    j = 0
    while j <= c:
        rows_j = bos + j * C + idx
        m_j = rows_j < eos
        ds, db_j = _dlogits(q, k, v, do, lse, delta, g, beta, lse_s, delta_s, rows_i, m_i, rows_j, m_j, bos, scale,
                            H, i_h, K, V, C, BK, BV, ACC, DOT_PREC, HAS_STRICT)
        acc += tl.dot(ds, load_tile(k, rows_j, m_j, H, i_h, K, kc, ACC), input_precision=DOT_PREC)
        db += db_j
        j += 1
    store_tile(dq, scale * acc, rows_i, m_i, H, i_h, K, kc)
    if HAS_STRICT:
        if i_k == 0:
            tl.store(dbeta + rows_i * H + i_h, (-db).to(dbeta.dtype.element_ty), mask=m_i)


@triton.jit
def attn_bwd_dk_kernel(q, k, v, do, lse, delta, g, beta, lse_s, delta_s, dk, offsets, chunks, scale_ptr, H,
                       K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       ACC: tl.constexpr, DOT_PREC: tl.constexpr, HAS_STRICT: tl.constexpr):
    """dK_j = scale sum_{i>=j} dS_ij^T Q_i for key block j (K columns of chunk i_k). Grid (NC, H, cdiv(K, BK))."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)
    bos, eos, c = block_rows(offsets, chunks, i_c, C)
    idx = tl.arange(0, C)
    kc = i_k * BK + tl.arange(0, BK)
    rows_j = bos + c * C + idx
    m_j = rows_j < eos
    acc = tl.zeros([C, BK], dtype=ACC)
    nb = tl.cdiv(eos - bos, C)
    i = c
    while i < nb:
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        ds, _ = _dlogits(q, k, v, do, lse, delta, g, beta, lse_s, delta_s, rows_i, m_i, rows_j, m_j, bos, scale,
                         H, i_h, K, V, C, BK, BV, ACC, DOT_PREC, HAS_STRICT)
        acc += tl.dot(tl.trans(ds), load_tile(q, rows_i, m_i, H, i_h, K, kc, ACC), input_precision=DOT_PREC)
        i += 1
    store_tile(dk, scale * acc, rows_j, m_j, H, i_h, K, kc)


# ---------------------------------------------------------------- host launchers

def attention_forward(q, k, v, scale, offsets, chunks, C):
    """(o [B, T, H, V] in q's dtype, lse [B, T, H] in the accumulation dtype); v may be in another dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    mt = meta(q.dtype, K, V, C)
    o = new_empty((B, T, H, V), q.dtype, q.device)
    lse = new_empty((B, T, H), acc_dtype(q.dtype), q.device)
    if chunks.shape[0] and H:
        sc = scale_arg(scale, q.dtype, q.device)
        attn_fwd_kernel[(chunks.shape[0], H, triton.cdiv(V, mt["BV"]))](q, k, v, o, lse, offsets, chunks, sc, H,
                                                                        **mt)
    return o, lse


def attention_dv(q, k, do, lse, scale, offsets, chunks, C, V, dtype):
    """dV = A^T dO as [B, T, H, V] in `dtype`."""
    B, T, H, K = q.shape
    mt = meta(q.dtype, K, V, C)
    dv = new_empty((B, T, H, V), dtype, q.device)
    if chunks.shape[0] and H:
        sc = scale_arg(scale, q.dtype, q.device)
        attn_bwd_dv_kernel[(chunks.shape[0], H, triton.cdiv(V, mt["BV"]))](q, k, do, lse, dv, offsets, chunks, sc,
                                                                           H, **mt)
    return dv


def attention_dqdk(q, k, v, do, o, lse, scale, offsets, chunks, C, strict=None):
    """(dq, dk, dbeta or None) of o = A V; with strict = (g, v_in, beta, lse_s) also the strict softmax term of
    the DeltaFormer solve (here v is u, v_in the solve's right-hand side) and dbeta [B, T, H] in beta's dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    mt = meta(q.dtype, K, V, C)
    acc = acc_dtype(q.dtype)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk = new_empty(k.shape, k.dtype, q.device)
    dbeta = None if strict is None else new_empty((B, T, H), strict[2].dtype, q.device)
    NC = chunks.shape[0]
    if not NC or not H:
        return dq, dk, dbeta
    delta = new_empty((B, T, H), acc, q.device)
    if strict is None:
        g = v_in = beta = lse_s = delta_s = lse  # unused placeholders
    else:
        g, v_in, beta, lse_s = strict
        delta_s = new_empty((B, T, H), acc, q.device)
    has = strict is not None
    row_terms_kernel[(NC, H)](do, o, g, v_in, v, beta, delta, delta_s, offsets, chunks, H, V=V, C=C, BV=mt["BV"],
                              ACC=mt["ACC"], HAS_STRICT=has, num_warps=NUM_WARPS)
    NK = triton.cdiv(K, mt["BK"])
    sc = scale_arg(scale, q.dtype, q.device)
    attn_bwd_dq_kernel[(NC, H, NK)](q, k, v, do, lse, delta, g, beta, lse_s, delta_s, dq,
                                    dq if dbeta is None else dbeta, offsets, chunks, sc, H, HAS_STRICT=has, **mt)
    attn_bwd_dk_kernel[(NC, H, NK)](q, k, v, do, lse, delta, g, beta, lse_s, delta_s, dk, offsets, chunks, sc, H,
                                    HAS_STRICT=has, **mt)
    return dq, dk, dbeta


class CausalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, offsets, chunks, C):
        o, lse = attention_forward(q, k, v, scale, offsets, chunks, C)
        ctx.save_for_backward(q, k, v, o, lse, offsets, chunks)
        ctx.scale, ctx.C = scale, C
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, offsets, chunks = ctx.saved_tensors
        do = do.contiguous()
        dv = attention_dv(q, k, do, lse, ctx.scale, offsets, chunks, ctx.C, v.shape[-1], v.dtype)
        dq, dk, _ = attention_dqdk(q, k, v, do, o, lse, ctx.scale, offsets, chunks, ctx.C)
        return dq, dk, dv, None, None, None, None


@first_call
def causal_attention(q, k, v, scale=None, cu_seqlens=None, chunk_size=None):
    """Causal softmax attention o_i = sum_{j<=i} softmax_j(scale q_i . k_j) v_j, differentiable in q, k, v.

    q, k [B, T, H, K], v [B, T, H, V] (one dtype), cu_seqlens int [N + 1] (B = 1) or None; scale defaults to
    K^-1/2. Returns o [B, T, H, V] in the input dtype. Saves q, k, v, o and lse ([B, T, H], float32 or float64)
    for backward. chunk_size (rows per tile: 16, 32, 64 or 128) is a tuning knob."""
    B, T, H, K, V = check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens, B, T, q.device)
    scale = default_scale(scale, K)
    C = check_chunk_size(chunk_size, K, V)
    q, k, v = (x.contiguous() for x in (q, k, v))
    offsets, chunks, _, _ = chunk_index(cu_seqlens, B, T, C, q.device)
    return CausalAttentionFunction.apply(q, k, v, scale, offsets, chunks, C)
