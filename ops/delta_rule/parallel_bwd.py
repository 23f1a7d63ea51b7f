"""Backward kernels of the quadratic ("parallel") delta rule (forward in parallel_fwd.py).

With R = diag(beta) (V - K S0), Ut = L^-1 R and o = scale (Q S0 + (Q K^T * M) Ut), given dO:

    dUt = scale (Q K^T * M)^T dO,    dR = L^-T dUt,    dV = diag(beta) dR
    P = dO Ut^T * M (inclusive),     D = -(dR Ut^T) * M_strict  (= dL on the strictly lower part)
    dQ = scale (dO S0^T + P K)
    F = D K - dR S0^T,   dK = scale P^T Q + D^T diag(beta) K + diag(beta) F,   dbeta = rowsum(K * F) + rowsum(dR * V)
    dS0 = scale Q^T dO - K^T diag(beta) dR

dR comes from a blocked backward substitution (sequential over blocks, last first); the rest is parallel over
blocks, recomputing the T x T tiles of P and D from dO, dR and Ut instead of storing them.
"""
import triton
import triton.language as tl

from ops.delta_rule.parallel_fwd import diagonal_block_inverse, load_own_tile, load_state, load_tile, load_vec


@triton.jit
def solve_bwd_kernel(q, k, beta, do, dr, dv, offsets, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """dR = L^-T dUt, dUt = scale (Q K^T * M)^T dO, by blocked backward substitution, block i after blocks l > i:

        dR_i = X_ii^T (scale sum_{l>=i} (K_i Q_l^T * M^T) dO_l - sum_{l>i} (K_i K_l^T) diag(beta_l) dR_l),

    X_ii = L_ii^-1; also dV_i = diag(beta_i) dR_i. Grid (N * H, cdiv(V, BV))."""
    i_nh, i_v = tl.program_id(0), tl.program_id(1)
    scale = tl.load(scale_ptr)  # (a tensor: a Python float would reach the GPU as fp32)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    cols = i_v * BV + tl.arange(0, BV)
    nb = tl.cdiv(eos - bos, C)
    i = nb - 1
    while i >= 0:
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        b_i = load_vec(beta, rows_i, m_i, H, i_h, ACC)
        # diagonal block: scale (K_i Q_i^T * M^T) dO_i
        gq = tl.zeros([C, C], dtype=ACC)
        for k0 in range(0, K, BK):
            kc = k0 + tl.arange(0, BK)
            gq += tl.dot(load_tile(k, rows_i, m_i, H, i_h, K, kc, ACC),
                         tl.trans(load_tile(q, rows_i, m_i, H, i_h, K, kc, ACC)), input_precision=DOT_PREC)
        gq = tl.where(idx[:, None] <= idx[None, :], gq, 0.0)
        acc = scale * tl.dot(gq, load_tile(do, rows_i, m_i, H, i_h, V, cols, ACC), input_precision=DOT_PREC)
        l = i + 1
        while l < nb:
            rows_l = bos + l * C + idx
            m_l = rows_l < eos
            gq = tl.zeros([C, C], dtype=ACC)
            gk = tl.zeros([C, C], dtype=ACC)
            for k0 in range(0, K, BK):
                kc = k0 + tl.arange(0, BK)
                k_i = load_tile(k, rows_i, m_i, H, i_h, K, kc, ACC)
                gq += tl.dot(k_i, tl.trans(load_tile(q, rows_l, m_l, H, i_h, K, kc, ACC)), input_precision=DOT_PREC)
                gk += tl.dot(k_i, tl.trans(load_tile(k, rows_l, m_l, H, i_h, K, kc, ACC)), input_precision=DOT_PREC)
            b_l = load_vec(beta, rows_l, m_l, H, i_h, ACC)
            acc += scale * tl.dot(gq, load_tile(do, rows_l, m_l, H, i_h, V, cols, ACC), input_precision=DOT_PREC)
            acc -= tl.dot(gk * b_l[None, :], load_own_tile(dr, rows_l, m_l, H, i_h, V, cols, ACC),
                          input_precision=DOT_PREC)
            l += 1
        x = diagonal_block_inverse(k, rows_i, m_i, b_i, eos - bos - i * C, H, i_h, K, C, BK, ACC, DOT_PREC)
        dr_i = tl.dot(tl.trans(x), acc, input_precision=DOT_PREC)
        out = (rows_i[:, None] * H + i_h) * V + cols[None, :]
        mask = m_i[:, None] & (cols[None, :] < V)
        tl.store(dr + out, dr_i.to(dr.dtype.element_ty), mask=mask)
        tl.store(dv + out, (b_i[:, None] * dr_i).to(dv.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # earlier blocks of this program read dr_i back
        i -= 1


@triton.jit
def rows_bwd_kernel(q, k, v, beta, s0, ut, do, dr, dq, dk_rows, dbeta_parts, offsets, chunks, scale_ptr, NT, H,
                    K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                    DOT_PREC: tl.constexpr, HAS_S0: tl.constexpr):
    """Row block i, K columns of block i_k (P and D tiles recomputed over V in chunks of BV):

        dQ_i = scale (dO_i S0^T + sum_{j<=i} P_ij K_j),    F_i = sum_{j<i} D_ij K_j - dR_i S0^T,
        dk_rows_i = diag(beta_i) F_i,    dbeta_parts[i_k, i] = rowsum(K_i * F_i) (+ rowsum(dR_i * V_i) if i_k = 0).

    Grid (number of (sequence, block) pairs, H, cdiv(K, BK))."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)  # (a tensor: a Python float would reach the GPU as fp32)
    i_n = tl.load(chunks + 2 * i_c).to(tl.int64)
    c = tl.load(chunks + 2 * i_c + 1)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    kc = i_k * BK + tl.arange(0, BK)
    rows_i = bos + c * C + idx
    m_i = rows_i < eos
    acc_q = tl.zeros([C, BK], dtype=ACC)
    acc_f = tl.zeros([C, BK], dtype=ACC)
    if HAS_S0:
        for v0 in range(0, V, BV):
            vc = v0 + tl.arange(0, BV)
            s_t = tl.trans(load_state(s0, i_n, i_h, H, K, V, kc, vc, ACC))
            acc_q += tl.dot(load_tile(do, rows_i, m_i, H, i_h, V, vc, ACC), s_t, input_precision=DOT_PREC)
            acc_f -= tl.dot(load_tile(dr, rows_i, m_i, H, i_h, V, vc, ACC), s_t, input_precision=DOT_PREC)
    j = 0
    while j <= c:
        rows_j = bos + j * C + idx
        m_j = rows_j < eos
        p = tl.zeros([C, C], dtype=ACC)
        d = tl.zeros([C, C], dtype=ACC)
        for v0 in range(0, V, BV):
            vc = v0 + tl.arange(0, BV)
            u_j = tl.trans(load_tile(ut, rows_j, m_j, H, i_h, V, vc, ACC))
            p += tl.dot(load_tile(do, rows_i, m_i, H, i_h, V, vc, ACC), u_j, input_precision=DOT_PREC)
            d += tl.dot(load_tile(dr, rows_i, m_i, H, i_h, V, vc, ACC), u_j, input_precision=DOT_PREC)
        p = tl.where(rows_i[:, None] >= rows_j[None, :], p, 0.0)
        d = tl.where(rows_i[:, None] > rows_j[None, :], -d, 0.0)
        k_j = load_tile(k, rows_j, m_j, H, i_h, K, kc, ACC)
        acc_q += tl.dot(p, k_j, input_precision=DOT_PREC)
        acc_f += tl.dot(d, k_j, input_precision=DOT_PREC)
        j += 1
    out = (rows_i[:, None] * H + i_h) * K + kc[None, :]
    mask = m_i[:, None] & (kc[None, :] < K)
    tl.store(dq + out, (scale * acc_q).to(dq.dtype.element_ty), mask=mask)
    b_i = load_vec(beta, rows_i, m_i, H, i_h, ACC)
    tl.store(dk_rows + out, (b_i[:, None] * acc_f).to(dk_rows.dtype.element_ty), mask=mask)
    db = tl.sum(load_tile(k, rows_i, m_i, H, i_h, K, kc, ACC) * acc_f, 1)
    if i_k == 0:
        for v0 in range(0, V, BV):
            vc = v0 + tl.arange(0, BV)
            db += tl.sum(load_tile(dr, rows_i, m_i, H, i_h, V, vc, ACC) * load_tile(v, rows_i, m_i, H, i_h, V, vc, ACC),
                         1)
    tl.store(dbeta_parts + (i_k * NT + rows_i) * H + i_h, db.to(dbeta_parts.dtype.element_ty), mask=m_i)


@triton.jit
def cols_bwd_kernel(q, k, beta, ut, do, dr, dk_rows, dk, offsets, chunks, scale_ptr, H,
                    K: tl.constexpr, V: tl.constexpr,
                    C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """Column block j, K columns of block i_k: dK_j = dk_rows_j + sum_{i>=j} (scale P_ij Q_i + D_ij diag(beta_i) K_i)
    (P^T and D^T tiles recomputed over V in chunks of BV). Grid (number of (sequence, block) pairs, H, cdiv(K, BK))."""
    i_c, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)  # (a tensor: a Python float would reach the GPU as fp32)
    i_n = tl.load(chunks + 2 * i_c).to(tl.int64)
    c = tl.load(chunks + 2 * i_c + 1)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    kc = i_k * BK + tl.arange(0, BK)
    rows_j = bos + c * C + idx
    m_j = rows_j < eos
    acc = tl.zeros([C, BK], dtype=ACC)
    i = c
    while i < tl.cdiv(eos - bos, C):
        rows_i = bos + i * C + idx
        m_i = rows_i < eos
        pt = tl.zeros([C, C], dtype=ACC)
        dt = tl.zeros([C, C], dtype=ACC)
        for v0 in range(0, V, BV):
            vc = v0 + tl.arange(0, BV)
            u_j = load_tile(ut, rows_j, m_j, H, i_h, V, vc, ACC)
            pt += tl.dot(u_j, tl.trans(load_tile(do, rows_i, m_i, H, i_h, V, vc, ACC)), input_precision=DOT_PREC)
            dt += tl.dot(u_j, tl.trans(load_tile(dr, rows_i, m_i, H, i_h, V, vc, ACC)), input_precision=DOT_PREC)
        pt = tl.where(rows_i[None, :] >= rows_j[:, None], pt, 0.0)
        dt = tl.where(rows_i[None, :] > rows_j[:, None], -dt, 0.0)
        b_i = load_vec(beta, rows_i, m_i, H, i_h, ACC)
        acc += scale * tl.dot(pt, load_tile(q, rows_i, m_i, H, i_h, K, kc, ACC), input_precision=DOT_PREC)
        acc += tl.dot(dt, b_i[:, None] * load_tile(k, rows_i, m_i, H, i_h, K, kc, ACC), input_precision=DOT_PREC)
        i += 1
    acc += load_tile(dk_rows, rows_j, m_j, H, i_h, K, kc, ACC)
    out = (rows_j[:, None] * H + i_h) * K + kc[None, :]
    tl.store(dk + out, acc.to(dk.dtype.element_ty), mask=m_j[:, None] & (kc[None, :] < K))


@triton.jit
def state_bwd_kernel(q, k, beta, do, dr, ds0, offsets, scale_ptr, H, K: tl.constexpr, V: tl.constexpr,
                     C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """dS0 = scale Q^T dO - K^T diag(beta) dR over one sequence's tokens (zero for an empty sequence).
    Grid (N * H, cdiv(K, BK), cdiv(V, BV))."""
    i_nh, i_k, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    scale = tl.load(scale_ptr)  # (a tensor: a Python float would reach the GPU as fp32)
    i_n, i_h = (i_nh // H).to(tl.int64), i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    idx = tl.arange(0, C)
    kc = i_k * BK + tl.arange(0, BK)
    vc = i_v * BV + tl.arange(0, BV)
    acc = tl.zeros([BK, BV], dtype=ACC)
    t0 = bos
    while t0 < eos:
        rows = t0 + idx
        m = rows < eos
        q_t = tl.trans(load_tile(q, rows, m, H, i_h, K, kc, ACC))
        bk_t = tl.trans(load_vec(beta, rows, m, H, i_h, ACC)[:, None] * load_tile(k, rows, m, H, i_h, K, kc, ACC))
        acc += scale * tl.dot(q_t, load_tile(do, rows, m, H, i_h, V, vc, ACC), input_precision=DOT_PREC)
        acc -= tl.dot(bk_t, load_tile(dr, rows, m, H, i_h, V, vc, ACC), input_precision=DOT_PREC)
        t0 += C
    p = ds0 + ((i_n * H + i_h) * K + kc[:, None]) * V + vc[None, :]
    tl.store(p, acc.to(ds0.dtype.element_ty), mask=(kc[:, None] < K) & (vc[None, :] < V))
