"""The DeltaFormer solve: u = L^-1 v with L = I + diag(b) P, and its adjoint g = L^-T x, blockwise in Triton.

Per sequence and head, P_ij = exp(S_ij - lse_s_i) for j < i (zero on and above the diagonal) is the strictly
causal softmax of the logits S = scale Q K^T, with row statistics lse_s_i = log sum_{j<i} e^{S_ij} from a
flash-style pass (strict_lse_kernel; rows with no j < i get 0, their P row is empty). b is beta with each
sequence's first token set to 0 (it multiplies an empty sum: u_0 = v_0). L is unit lower triangular, T x T, and
never stored: its tiles are recomputed from q, k and lse_s.

  forward substitution over blocks of C rows, block i after blocks j < i:
      u_i = X_ii (v_i - diag(b_i) sum_{j<i} P_ij u_j),                     X_ii = (I + diag(b_i) P_ii)^-1
  backward substitution (the adjoint, L^T = I + P^T diag(b)), block i after blocks l > i:
      g_i = X_ii^T (x_i - sum_{l>i} P_li^T diag(b_l) g_l)

X_ii comes from ops.common.solve_tril.solve_unit_lower on the register tile. One program per (sequence, head,
column chunk of V) walks the blocks in order; blocks never cross sequences.
"""
import triton
import triton.language as tl

from ops.common.solve_tril import solve_unit_lower
from ops.common.utils import (
    acc_dtype,
    check_cu_seqlens,
    check_head_size,
    check_qkv,
    check_tensor,
    chunk_index,
    default_scale,
    new_empty,
    scale_arg,
)
from ops.deltaformer.attention import (
    block_rows,
    check_chunk_size,
    load_own_tile,
    load_tile,
    load_vec,
    logits,
    meta,
    store_tile,
)


@triton.jit
def strict_lse_kernel(q, k, lse_s, offsets, chunks, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """lse_s_i = log sum_{j<i} exp(S_ij) for query block i, by online max / normalizer over key blocks j <= i;
    0 where the row is empty (a sequence's first token). Grid (NC, H)."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)
    bos, eos, c = block_rows(offsets, chunks, i_c, C)
    idx = tl.arange(0, C)
    rows_i = bos + c * C + idx
    m_i = rows_i < eos
    m = tl.full([C], float("-inf"), dtype=ACC)
    l = tl.zeros([C], dtype=ACC)
    j = 0
    while j <= c:
        rows_j = bos + j * C + idx
        m_j = rows_j < eos
        s = logits(q, rows_i, m_i, k, rows_j, m_j, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
        s = tl.where((rows_i[:, None] > rows_j[None, :]) & m_j[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_use) + tl.sum(tl.exp(s - m_use[:, None]), 1)
        m = m_new
        j += 1
    out = tl.where(l > 0, m + tl.log(tl.where(l > 0, l, 1.0)), 0.0)
    tl.store(lse_s + rows_i * H + i_h, out.to(lse_s.dtype.element_ty), mask=m_i)


@triton.jit
def _strict_softmax_tile(q, k, lse_s, rows_i, m_i, rows_j, m_j, scale, H, i_h, K: tl.constexpr,
                         C: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """P[rows_i, rows_j] = exp(S - lse_s_i) where rows_i > rows_j (both valid), else 0."""
    s = logits(q, rows_i, m_i, k, rows_j, m_j, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
    lse_i = load_vec(lse_s, rows_i, m_i, H, i_h, ACC)
    keep = (rows_i[:, None] > rows_j[None, :]) & m_i[:, None] & m_j[None, :]
    return tl.where(keep, tl.exp(s - lse_i[:, None]), 0.0)


@triton.jit
def solve_fwd_kernel(q, k, v, beta, lse_s, u, offsets, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """u = (I + diag(b) P)^-1 v by blocked forward substitution (see the module docstring). u in ACC.
    Grid (N * H, cdiv(V, BV))."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    vc = i_v * BV + tl.arange(0, BV)
    i = 0
    while i < tl.cdiv(eos - bos, C):
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        b_i = load_vec(beta, rows_i, m_i & (rows_i > bos), H, i_h, ACC)
        acc = tl.zeros([C, BV], dtype=ACC)  # sum_{j<i} P_ij u_j
        j = 0
        while j < i:
            rows_j = bos + j * C + idx
            m_j = rows_j < eos
            p = _strict_softmax_tile(q, k, lse_s, rows_i, m_i, rows_j, m_j, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
            acc += tl.dot(p, load_own_tile(u, rows_j, m_j, H, i_h, V, vc, ACC), input_precision=DOT_PREC)
            j += 1
        p = _strict_softmax_tile(q, k, lse_s, rows_i, m_i, rows_i, m_i, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
        x = solve_unit_lower(b_i[:, None] * p, C, DOT_PREC)
        rhs = load_tile(v, rows_i, m_i, H, i_h, V, vc, ACC) - b_i[:, None] * acc
        store_tile(u, tl.dot(x, rhs, input_precision=DOT_PREC), rows_i, m_i, H, i_h, V, vc)
        tl.debug_barrier()  # later blocks of this program read u_i back
        i += 1


@triton.jit
def solve_bwd_kernel(q, k, beta, lse_s, x, copy, offsets, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                     DOT_PREC: tl.constexpr, HAS_COPY: tl.constexpr):
    """g = (I + diag(b) P)^-T x in place of x (ACC) by blocked backward substitution (see the module docstring);
    with HAS_COPY also copy = g in copy's dtype. Grid (N * H, cdiv(V, BV))."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    vc = i_v * BV + tl.arange(0, BV)
    nb = tl.cdiv(eos - bos, C)
    i = nb - 1
    while i >= 0:
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        b_i = load_vec(beta, rows_i, m_i & (rows_i > bos), H, i_h, ACC)
        acc = load_tile(x, rows_i, m_i, H, i_h, V, vc, ACC)
        l = i + 1
        while l < nb:
            rows_l = bos + l * C + idx
            m_l = rows_l < eos
            b_l = load_vec(beta, rows_l, m_l, H, i_h, ACC)  # rows_l > bos: l > 0
            p = _strict_softmax_tile(q, k, lse_s, rows_l, m_l, rows_i, m_i, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
            g_l = load_own_tile(x, rows_l, m_l, H, i_h, V, vc, ACC)
            acc -= tl.dot(tl.trans(p), b_l[:, None] * g_l, input_precision=DOT_PREC)
            l += 1
        p = _strict_softmax_tile(q, k, lse_s, rows_i, m_i, rows_i, m_i, scale, H, i_h, K, C, BK, ACC, DOT_PREC)
        xi = solve_unit_lower(b_i[:, None] * p, C, DOT_PREC)
        g_i = tl.dot(tl.trans(xi), acc, input_precision=DOT_PREC)
        tl.debug_barrier()  # every thread has read x_i before it is overwritten
        store_tile(x, g_i, rows_i, m_i, H, i_h, V, vc)
        if HAS_COPY:
            store_tile(copy, g_i, rows_i, m_i, H, i_h, V, vc)
        tl.debug_barrier()  # earlier blocks of this program read g_i back
        i -= 1


# ---------------------------------------------------------------- host launchers

def strict_lse(q, k, scale, offsets, chunks, C):
    """Row statistics lse_s [B, T, H] of the strictly causal softmax, in the accumulation dtype."""
    B, T, H, K = q.shape
    mt = meta(q.dtype, K, 16, C)
    lse_s = new_empty((B, T, H), acc_dtype(q.dtype), q.device)
    if chunks.shape[0] and H:
        strict_lse_kernel[(chunks.shape[0], H)](q, k, lse_s, offsets, chunks, scale_arg(scale, q.dtype, q.device), H,
                                                **mt)
    return lse_s


def solve_forward(q, k, v, beta, lse_s, scale, offsets, C):
    """u = L^-1 v as [B, T, H, V] in the accumulation dtype."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    mt = meta(q.dtype, K, V, C)
    u = new_empty((B, T, H, V), acc_dtype(q.dtype), q.device)
    N = offsets.numel() - 1
    if B * T and H:
        solve_fwd_kernel[(N * H, triton.cdiv(V, mt["BV"]))](q, k, v, beta, lse_s, u, offsets,
                                                            scale_arg(scale, q.dtype, q.device), H, **mt)
    return u


def solve_adjoint_(q, k, x, beta, lse_s, scale, offsets, C, copy_dtype=None):
    """x <- L^-T x in place (x [B, T, H, V] in the accumulation dtype, contiguous); returns (x, a copy in
    copy_dtype or None)."""
    B, T, H, K = q.shape
    V = x.shape[-1]
    mt = meta(q.dtype, K, V, C)
    copy = None if copy_dtype is None else new_empty(x.shape, copy_dtype, q.device)
    N = offsets.numel() - 1
    if B * T and H:
        solve_bwd_kernel[(N * H, triton.cdiv(V, mt["BV"]))](q, k, beta, lse_s, x, x if copy is None else copy,
                                                            offsets, scale_arg(scale, q.dtype, q.device), H,
                                                            HAS_COPY=copy is not None, **mt)
    return x, copy


def _prepare(q, k, beta, scale, cu_seqlens, chunk_size, V):
    """Checks shared by invcum and invcum_adjoint (q, k and the right-hand side checked by the caller)."""
    B, T, H, K = q.shape
    if beta is not None:
        check_tensor("beta", beta, ndim=3, shape=(B, T, H), device=q.device, dtype=q.dtype)
    check_cu_seqlens(cu_seqlens, B, T, q.device)
    scale = default_scale(scale, K)
    C = check_chunk_size(chunk_size, K, V)
    beta = q.new_ones((B, T, H)) if beta is None else beta.contiguous()
    offsets, chunks, _, _ = chunk_index(cu_seqlens, B, T, C, q.device)
    return q.contiguous(), k.contiguous(), beta, scale, C, offsets, chunks


def invcum(q, k, v, beta=None, scale=None, cu_seqlens=None, chunk_size=None):
    """u solving (I + diag(beta) P) u = v, P the strictly causal softmax of scale q k^T per sequence and head.
    q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] or None (ones). Returns u [B, T, H, V] in the
    accumulation dtype (float32; float64 for float64 inputs). Not differentiable (see parallel.py)."""
    check_qkv(q, k, v)
    q, k, beta, scale, C, offsets, chunks = _prepare(q, k, beta, scale, cu_seqlens, chunk_size, v.shape[-1])
    lse_s = strict_lse(q, k, scale, offsets, chunks, C)
    return solve_forward(q, k, v.contiguous(), beta, lse_s, scale, offsets, C)


def invcum_adjoint(q, k, x, beta=None, scale=None, cu_seqlens=None, chunk_size=None):
    """g solving (I + diag(beta) P)^T g = x (the solve's adjoint), same arguments as invcum with x [B, T, H, V]
    in q's dtype or the accumulation dtype. Returns g in the accumulation dtype."""
    check_qkv(q, k, q)
    check_tensor("x", x, ndim=4, device=q.device)
    if x.dtype not in (q.dtype, acc_dtype(q.dtype)):
        raise TypeError(f"x has dtype {x.dtype}; expected {q.dtype} or {acc_dtype(q.dtype)}")
    if tuple(x.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"x must have shape [B, T, H, V] = [{', '.join(map(str, q.shape[:3]))}, V], "
                         f"got {tuple(x.shape)}")
    check_head_size("x", x.shape[-1])
    q, k, beta, scale, C, offsets, chunks = _prepare(q, k, beta, scale, cu_seqlens, chunk_size, x.shape[-1])
    lse_s = strict_lse(q, k, scale, offsets, chunks, C)
    g = new_empty(x.shape, acc_dtype(q.dtype), q.device)
    g.copy_(x)
    return solve_adjoint_(q, k, g, beta, lse_s, scale, offsets, C)[0]
