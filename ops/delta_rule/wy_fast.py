"""WY (UT) representation of each chunk of the delta rule, forward and backward.

Per chunk (C rows; rows past the sequence end are zero) and head:
    A = tril(diag(beta) K K^T, -1),  X = (I + A)^-1,  T = X diag(beta),  W = T K,  U = T V,
so that prod_i (I - beta_i k_i k_i^T) = I - K^T W (newest on the left) and the chunk's write is K^T U.
X ([NC, H, C, C], saved for the backward) is kept in the accumulation dtype, W in its dot operands' type
(utils.operand_storage), U in that type too where it is half (utils.sum_storage: chunk_h_fwd adds to it).
"""
import triton
import triton.language as tl

from ops.common.solve_tril import solve_unit_lower
from ops.common.utils import (
    acc_dtype,
    block_size,
    dot_precision,
    launch_fitting,
    new_empty,
    operand_storage,
    operand_type,
    pipeline_stages,
    sum_storage,
)


@triton.jit
def wy_fwd_kernel(k, v, beta, w, u, x, offsets, cmap,
                  H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """grid (NC, H): X = (I + tril(diag(beta) K K^T, -1))^-1; W = X diag(beta) K; U = X diag(beta) V.
    K K^T, T K and T V take OP operands (T rounded to OP for them); the inverse is solved in ACC."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = x.dtype.element_ty

    p_b = tl.make_block_ptr(beta + bos * H + i_h, (L,), (H,), (j * C,), (C,), (0,))
    b_b = tl.load(p_b, boundary_check=(0,)).to(ACC)
    b_A = tl.zeros([C, C], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1)).to(OP)
        b_A += tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC)
    b_X = solve_unit_lower(b_A * b_b[:, None], C, DOT_PREC)
    p_x = tl.make_block_ptr(x + (i_c * H + i_h).to(tl.int64) * C * C, (C, C), (C, 1), (0, 0), (C, C), (1, 0))
    tl.store(p_x, b_X)

    b_T = (b_X * b_b[None, :]).to(OP)
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        p_w = tl.make_block_ptr(w + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1)).to(OP)
        tl.store(p_w, tl.dot(b_T, b_k, input_precision=DOT_PREC).to(p_w.dtype.element_ty), boundary_check=(0, 1))
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + (bos * H + i_h) * V, (L, V), (H * V, 1), (j * C, i_v * BV), (C, BV), (1, 0))
        p_u = tl.make_block_ptr(u + (bos * H + i_h) * V, (L, V), (H * V, 1), (j * C, i_v * BV), (C, BV), (1, 0))
        b_v = tl.load(p_v, boundary_check=(0, 1)).to(OP)
        tl.store(p_u, tl.dot(b_T, b_v, input_precision=DOT_PREC).to(p_u.dtype.element_ty), boundary_check=(0, 1))


@triton.jit
def wy_bwd_kernel(k, v, beta, x, dw, du, dk_in, dk, dv, dbeta, offsets, cmap,
                  H, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, DOT_PREC: tl.constexpr, OP: tl.constexpr):
    """grid (NC, H). Given dW, dU (and dk_in, the gradient k already has from elsewhere):
        dV = diag(beta) X^T dU,   dK = dk_in + diag(beta) X^T dW + diag(beta) dA K + (diag(beta) dA)^T K,
        dbeta = rowsum(X^T dW * K) + rowsum(X^T dU * V) + rowsum(dA * K K^T),
    with dX = dW (diag(beta) K)^T + dU (diag(beta) V)^T and dA = tril(-X^T dX X^T, -1).
    The [C, C] x [C, BK or BV] products with a loaded operand (X^T dW, dW (diag(beta) K)^T, K K^T, X^T dU,
    dU (diag(beta) V)^T) take OP operands; dA's [C, C] chain and M K, whose operands are formed here, keep ACC.
    dW and dU are read only as OP operands (so they may arrive rounded to OP); dk_in is added in ACC."""
    i_c, i_h = tl.program_id(0), tl.program_id(1)
    i_n, j = tl.load(cmap + i_c * 2), tl.load(cmap + i_c * 2 + 1)
    bos, eos = tl.load(offsets + i_n).to(tl.int64), tl.load(offsets + i_n + 1).to(tl.int64)
    L = eos - bos
    ACC = x.dtype.element_ty

    p_b = tl.make_block_ptr(beta + bos * H + i_h, (L,), (H,), (j * C,), (C,), (0,))
    b_b = tl.load(p_b, boundary_check=(0,)).to(ACC)
    p_x = tl.make_block_ptr(x + (i_c * H + i_h).to(tl.int64) * C * C, (C, C), (C, 1), (0, 0), (C, C), (1, 0))
    b_Xt = tl.trans(tl.load(p_x))
    b_Xto = b_Xt.to(OP)

    b_dX = tl.zeros([C, C], dtype=ACC)
    b_KK = tl.zeros([C, C], dtype=ACC)
    b_db = tl.zeros([C], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        p_dw = tl.make_block_ptr(dw + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1)).to(ACC)
        b_dw = tl.load(p_dw, boundary_check=(0, 1)).to(OP)
        b_ko = b_k.to(OP)
        b_db += tl.sum(tl.dot(b_Xto, b_dw, input_precision=DOT_PREC) * b_k, 1)
        b_dX += tl.dot(b_dw, tl.trans((b_k * b_b[:, None]).to(OP)), input_precision=DOT_PREC)
        b_KK += tl.dot(b_ko, tl.trans(b_ko), input_precision=DOT_PREC)
    for i_v in range(tl.cdiv(V, BV)):
        p_v = tl.make_block_ptr(v + (bos * H + i_h) * V, (L, V), (H * V, 1), (j * C, i_v * BV), (C, BV), (1, 0))
        p_du = tl.make_block_ptr(du + (bos * H + i_h) * V, (L, V), (H * V, 1), (j * C, i_v * BV), (C, BV), (1, 0))
        p_dv = tl.make_block_ptr(dv + (bos * H + i_h) * V, (L, V), (H * V, 1), (j * C, i_v * BV), (C, BV), (1, 0))
        b_v = tl.load(p_v, boundary_check=(0, 1)).to(ACC)
        b_du = tl.load(p_du, boundary_check=(0, 1)).to(OP)
        b_XtdU = tl.dot(b_Xto, b_du, input_precision=DOT_PREC)
        tl.store(p_dv, (b_XtdU * b_b[:, None]).to(p_dv.dtype.element_ty), boundary_check=(0, 1))
        b_db += tl.sum(b_XtdU * b_v, 1)
        b_dX += tl.dot(b_du, tl.trans((b_v * b_b[:, None]).to(OP)), input_precision=DOT_PREC)

    rows = tl.arange(0, C)[:, None]
    cols = tl.arange(0, C)[None, :]
    b_dA = -tl.dot(tl.dot(b_Xt, b_dX, input_precision=DOT_PREC), b_Xt, input_precision=DOT_PREC)
    b_dA = tl.where(rows > cols, b_dA, 0.0)
    b_db += tl.sum(b_dA * b_KK, 1)
    p_db = tl.make_block_ptr(dbeta + bos * H + i_h, (L,), (H,), (j * C,), (C,), (0,))
    tl.store(p_db, b_db.to(p_db.dtype.element_ty), boundary_check=(0,))

    # diag(beta) dA K + (diag(beta) dA)^T K = M K with the symmetric M = bdA + bdA^T (formed once; a transposed
    # dot result fed straight into tl.dot miscompiles on Hopper, cf. fla PR 826)
    b_bdA = b_dA * b_b[:, None]
    b_M = b_bdA + tl.trans(b_bdA)
    for i_k in range(tl.cdiv(K, BK)):
        p_k = tl.make_block_ptr(k + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        p_dw = tl.make_block_ptr(dw + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        p_dki = tl.make_block_ptr(dk_in + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        p_dk = tl.make_block_ptr(dk + (bos * H + i_h) * K, (L, K), (H * K, 1), (j * C, i_k * BK), (C, BK), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1)).to(ACC)
        b_dw = tl.load(p_dw, boundary_check=(0, 1)).to(OP)
        b_dk = tl.load(p_dki, boundary_check=(0, 1)).to(ACC)
        b_dk += tl.dot(b_Xto, b_dw, input_precision=DOT_PREC) * b_b[:, None]
        b_dk += tl.dot(b_M, b_k, input_precision=DOT_PREC)
        tl.store(p_dk, b_dk.to(p_dk.dtype.element_ty), boundary_check=(0, 1))


# Largest K / V tile (tests lower it to reach the multi-tile loops with small head sizes).
TILE = 64


def _blocks(K, V):
    return min(TILE, block_size(K)), min(TILE, block_size(V))


def wy_fwd(k, v, beta, offsets, cmap, chunk_size):
    """k [B, T, H, K], v [B, T, H, V], beta [B, T, H] (contiguous); offsets, cmap from utils.sequence_offsets
    and utils.chunk_map. Returns W [B, T, H, K], U [B, T, H, V] (see the module docstring for their dtypes) and
    X [NC, H, C, C] (accumulation dtype)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C, NC, acc = chunk_size, cmap.shape[0], acc_dtype(k.dtype)
    BK, BV = _blocks(K, V)
    op = operand_type("wy_fwd", k.dtype, C, BK, BV)
    w = new_empty((B, T, H, K), operand_storage(op), k.device)
    u = new_empty((B, T, H, V), sum_storage(op), k.device)
    x = new_empty((NC, H, C, C), acc, k.device)
    if NC:
        a, e = u.element_size(), k.element_size()
        stages = pipeline_stages(C * max(BK, BV) * (a + e))  # a K (or V) tile in, a W (or U) tile out
        launch_fitting(wy_fwd_kernel, (NC, H), k, v, beta, w, u, x, offsets, cmap, H=H, K=K, V=V, C=C, BK=BK, BV=BV,
                       DOT_PREC=dot_precision(k.dtype), OP=op, stages=(stages,))
    return w, u, x


def bwd_operands(dtype, chunk_size, K, V):
    """wy_bwd_kernel's dot operand type (the one dW and dU are rounded to when read)."""
    return operand_type("wy_bwd", dtype, chunk_size, *_blocks(K, V))


def wy_bwd(k, v, beta, x, dw, du, dk_in, offsets, cmap, chunk_size):
    """Gradients of the WY stage: dW [B, T, H, K], dU [B, T, H, V] and dk_in (k's other gradient), each in the
    accumulation dtype or a half dtype (bwd_operands; dk_in: utils.sum_storage). Returns dk, dv, dbeta in the
    input dtype."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    C, NC = chunk_size, cmap.shape[0]
    dk = new_empty(k.shape, k.dtype, k.device)
    dv = new_empty(v.shape, v.dtype, v.device)
    dbeta = new_empty(beta.shape, beta.dtype, beta.device)
    if NC:
        BK, BV = _blocks(K, V)
        a, e = x.element_size(), k.element_size()
        stages = pipeline_stages(C * max(BK, BV) * (2 * a + 2 * e))  # K, dW, dk_in in; dK out (or V, dU; dV)
        launch_fitting(  # (the half-operand path's launch settings: utils.TUNED)
            wy_bwd_kernel, (NC, H), k, v, beta, x, dw, du, dk_in, dk, dv, dbeta, offsets, cmap, H=H, K=K, V=V, C=C,
            BK=BK, BV=BV, DOT_PREC=dot_precision(k.dtype), OP=bwd_operands(k.dtype, C, K, V),
            stages=(stages,))
    return dk, dv, dbeta
