"""Forward kernels of the quadratic ("parallel") delta rule, and the tile helpers its backward shares.

Per sequence and head, with L = I + tril(diag(beta) K K^T, -1) (unit lower triangular, T x T) and M the inclusive
causal mask:

    Ut = L^-1 diag(beta) (V - K S0),        o = scale (Q S0 + (Q K^T * M) Ut).

No state is formed: Ut comes from a blocked forward substitution over blocks of C rows whose off-diagonal tiles
K_i K_j^T are recomputed from K, and o is a causal linear attention over Ut. Tensors are addressed as
[tokens, H, D] with tokens the flattened B*T axis; `offsets` (int32 [N + 1]) gives each sequence's token range.
"""
import triton
import triton.language as tl


@triton.jit
def load_tile(ptr, rows, row_mask, H, i_h, D, cols, ACC: tl.constexpr):
    """x[rows, i_h, cols] of a [tokens, H, D] tensor, upcast to ACC; zero outside the rows and columns."""
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    return tl.load(p, mask=row_mask[:, None] & (cols[None, :] < D), other=0).to(ACC)


@triton.jit
def load_own_tile(ptr, rows, row_mask, H, i_h, D, cols, ACC: tl.constexpr):
    """load_tile for rows this program stored earlier (after a barrier): bypass L1 (.cg) to read them from L2."""
    p = ptr + (rows[:, None] * H + i_h) * D + cols[None, :]
    return tl.load(p, mask=row_mask[:, None] & (cols[None, :] < D), other=0, cache_modifier=".cg").to(ACC)


@triton.jit
def load_vec(ptr, rows, row_mask, H, i_h, ACC: tl.constexpr):
    """x[rows, i_h] of a [tokens, H] tensor (beta), upcast to ACC; zero outside the rows."""
    return tl.load(ptr + rows * H + i_h, mask=row_mask, other=0).to(ACC)


@triton.jit
def load_state(ptr, i_n, i_h, H, K, V, kcols, vcols, ACC: tl.constexpr):
    """S0[i_n, i_h, kcols, vcols] of an [N, H, K, V] state, upcast to ACC; zero outside K and V."""
    p = ptr + ((i_n * H + i_h) * K + kcols[:, None]) * V + vcols[None, :]
    return tl.load(p, mask=(kcols[:, None] < K) & (vcols[None, :] < V), other=0).to(ACC)


@triton.jit
def gram(a_ptr, a_rows, a_mask, b_ptr, b_rows, b_mask, H, i_h, K: tl.constexpr,
         C: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """A[a_rows] B[b_rows]^T ([C, C]) for two [tokens, H, K] tensors, summed over K in chunks of BK."""
    g = tl.zeros([C, C], dtype=ACC)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        a = load_tile(a_ptr, a_rows, a_mask, H, i_h, K, cols, ACC)
        b = load_tile(b_ptr, b_rows, b_mask, H, i_h, K, cols, ACC)
        g += tl.dot(a, tl.trans(b), input_precision=DOT_PREC)
    return g


@triton.jit
def unit_lower_inverse(a, n, C: tl.constexpr, ACC: tl.constexpr):
    """X = (I + a)^-1 for a strictly lower triangular [C, C] tile a whose rows >= n are zero, by forward
    substitution over rows: X_r = e_r - sum_{c<r} a_rc X_c (rows >= n stay e_r)."""
    idx = tl.arange(0, C)
    x = (idx[:, None] == idx[None, :]).to(ACC)
    r = 1
    while r < tl.minimum(n, C):  # while, not range: the interpreter (numpy >= 2.4) cannot range() over tensors
        a_r = tl.sum(tl.where(idx[:, None] == r, a, 0.0), 0)
        x_r = tl.sum(a_r[:, None] * x, 0)
        x = tl.where(idx[:, None] == r, x - x_r[None, :], x)
        r += 1
    return x


@triton.jit
def diagonal_block_inverse(k, rows, m, b, n, H, i_h, K: tl.constexpr,
                           C: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, DOT_PREC: tl.constexpr):
    """X_ii = L_ii^-1, L_ii = I + tril(diag(b) K_i K_i^T, -1) the diagonal block of L over `rows` (n valid)."""
    idx = tl.arange(0, C)
    g = gram(k, rows, m, k, rows, m, H, i_h, K, C, BK, ACC, DOT_PREC)
    return unit_lower_inverse(tl.where(idx[:, None] > idx[None, :], b[:, None] * g, 0.0), n, C, ACC)


@triton.jit
def solve_fwd_kernel(k, v, beta, s0, ut, offsets, T_ROW, H, K: tl.constexpr, V,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                     DOT_PREC: tl.constexpr, HAS_S0: tl.constexpr, IDENTITY_V: tl.constexpr):
    """Ut = L^-1 diag(beta) (V - K S0) by blocked forward substitution, block i after blocks j < i:

        Ut_i = X_ii diag(beta_i) (V_i - K_i S0 - sum_{j<i} (K_i K_j^T) Ut_j),    X_ii = L_ii^-1.

    Grid (N * H, cdiv(V, BV)): sequential over the blocks of one sequence, parallel over sequences, heads and
    V blocks. With IDENTITY_V, V is the identity over token columns (column = token index mod T_ROW), so
    Ut = L^-1 diag(beta) (for the attention matrix)."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    i = 0
    while i < tl.cdiv(eos - bos, C):
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        b_i = load_vec(beta, rows_i, m_i, H, i_h, ACC)
        if IDENTITY_V:
            rhs = ((rows_i % T_ROW)[:, None] == cols[None, :]).to(ACC)
        else:
            rhs = load_tile(v, rows_i, m_i, H, i_h, V, cols, ACC)
        if HAS_S0:
            for k0 in range(0, K, BK):
                kc = k0 + tl.arange(0, BK)
                k_i = load_tile(k, rows_i, m_i, H, i_h, K, kc, ACC)
                rhs -= tl.dot(k_i, load_state(s0, i_n.to(tl.int64), i_h, H, K, V, kc, cols, ACC),
                              input_precision=DOT_PREC)
        j = 0
        while j < i:
            rows_j = bos + j * C + idx
            g = gram(k, rows_i, m_i, k, rows_j, rows_j < eos, H, i_h, K, C, BK, ACC, DOT_PREC)
            rhs -= tl.dot(g, load_own_tile(ut, rows_j, rows_j < eos, H, i_h, V, cols, ACC), input_precision=DOT_PREC)
            j += 1
        x = diagonal_block_inverse(k, rows_i, m_i, b_i, eos - bos - i * C, H, i_h, K, C, BK, ACC, DOT_PREC)
        u_i = tl.dot(x, b_i[:, None] * rhs, input_precision=DOT_PREC)
        p = ut + (rows_i[:, None] * H + i_h) * V + cols[None, :]
        tl.store(p, u_i.to(ut.dtype.element_ty), mask=m_i[:, None] & (cols[None, :] < V))
        tl.debug_barrier()  # later blocks of this program read u_i back
        i += 1


@triton.jit
def output_fwd_kernel(q, k, ut, s0, o, offsets, chunks, scale_ptr, H, K: tl.constexpr, V,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                      DOT_PREC: tl.constexpr, HAS_S0: tl.constexpr):
    """o_i = scale (Q_i S0 + sum_{j<=i} (Q_i K_j^T * M) Ut_j) for query block i: causal linear attention over Ut.
    Grid (number of (sequence, block) pairs, H, cdiv(V, BV)); `chunks` holds the (sequence, block) pairs."""
    i_c, i_h, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)  # (a tensor: a Python float would reach the GPU as fp32)
    i_n = tl.load(chunks + 2 * i_c).to(tl.int64)
    c = tl.load(chunks + 2 * i_c + 1)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    rows_i = bos + c * C + idx
    m_i = rows_i < eos
    acc = tl.zeros([C, BV], dtype=ACC)
    if HAS_S0:
        for k0 in range(0, K, BK):
            kc = k0 + tl.arange(0, BK)
            acc += tl.dot(load_tile(q, rows_i, m_i, H, i_h, K, kc, ACC),
                          load_state(s0, i_n, i_h, H, K, V, kc, cols, ACC), input_precision=DOT_PREC)
    j = 0
    while j <= c:
        rows_j = bos + j * C + idx
        m_j = rows_j < eos
        g = gram(q, rows_i, m_i, k, rows_j, m_j, H, i_h, K, C, BK, ACC, DOT_PREC)
        g = tl.where(rows_i[:, None] >= rows_j[None, :], g, 0.0)
        acc += tl.dot(g, load_tile(ut, rows_j, m_j, H, i_h, V, cols, ACC), input_precision=DOT_PREC)
        j += 1
    p = o + (rows_i[:, None] * H + i_h) * V + cols[None, :]
    tl.store(p, (scale * acc).to(o.dtype.element_ty), mask=m_i[:, None] & (cols[None, :] < V))
