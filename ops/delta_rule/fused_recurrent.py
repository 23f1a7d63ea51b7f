"""The delta rule token by token (the inference / decode form), forward and backward in Triton.

Per sequence and head, with state S [K, V] (S_0 the initial state, or zeros):

    u_t = v_t - S_{t-1}^T k_t,    S_t = S_{t-1} + beta_t k_t u_t^T,    o_t = scale S_t^T q_t

which is S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. Each program keeps a [BK, BV] slice of S (all of
K, a block of V columns) in registers; the grid is (cdiv(V, BV), N * H). Columns of S evolve independently, so the
forward needs no communication between V blocks; the backward's dq, dk, dbeta sum over V and are written as
per-block partials [NV, ...] and summed on the host.
"""
import torch
import triton
import triton.language as tl

from ops.common.utils import (
    acc_dtype,
    block_size,
    check_cu_seqlens,
    check_qkv,
    check_state,
    check_tensor,
    default_scale,
    new_empty,
    sequence_offsets,
)

# State-tile budgets (elements of the accumulation dtype per program). The forward keeps its tile small: more
# programs along V give decode (T = 1, small N*H) enough parallelism to stream the state at full bandwidth. The
# backward keeps V blocks wide (fewer partial sums) up to what fits in registers without spilling.
FWD_TILE = 2048
BWD_TILE = 8192


def _tiles(K: int, V: int, budget: int, dtype: torch.dtype):
    """(BK, BV, num_warps): all of K in one tile, V blocked so BK * BV <= budget (halved for float64)."""
    if dtype == torch.float64:
        budget //= 2
    BK = block_size(K)
    BV = min(block_size(V, minimum=8), max(8, budget // BK))
    num_warps = max(1, min(8, BK * BV // 1024))
    return BK, BV, num_warps


@triton.jit
def _fwd_kernel(q, k, v, beta, u, o, h0, ht, offsets, scale: tl.float64,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr):
    """For t in the sequence: u_t = v_t - S^T k_t; S += k_t (beta_t u_t)^T; o_t = scale S^T q_t.
    Stores u (accumulation dtype, for the backward), o, and the final S when asked."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    ACC = u.dtype.element_ty
    scale = (tl.zeros([], dtype=ACC) + scale).to(ACC)  # scale arrives as float64 (exact for float64 inputs)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    p_q = q + (bos * H + i_h) * K + o_k
    p_k = k + (bos * H + i_h) * K + o_k
    p_v = v + (bos * H + i_h) * V + o_v
    p_u = u + (bos * H + i_h) * V + o_v
    p_o = o + (bos * H + i_h) * V + o_v
    p_beta = beta + bos * H + i_h
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0).to(ACC)
    t = bos
    while t < eos:  # (a while loop: the interpreter under numpy >= 2.4 cannot range() over loaded bounds)
        t += 1
        b_q = tl.load(p_q, mask=m_k, other=0).to(ACC)
        b_k = tl.load(p_k, mask=m_k, other=0).to(ACC)
        b_v = tl.load(p_v, mask=m_v, other=0).to(ACC)
        b_beta = tl.load(p_beta).to(ACC)
        b_u = b_v - tl.sum(b_h * b_k[:, None], 0)
        b_h += b_k[:, None] * (b_beta * b_u)[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(p_u, b_u, mask=m_v)
        tl.store(p_o, b_o.to(p_o.dtype.element_ty), mask=m_v)
        p_q += H * K
        p_k += H * K
        p_v += H * V
        p_u += H * V
        p_o += H * V
        p_beta += H
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h.to(ht.dtype.element_ty), mask=m_h)


@triton.jit
def _bwd_kernel(q, k, beta, u, do, dht, h0, dh0, du, dq, dk, dbeta, offsets, scale: tl.float64, NTOK,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_INITIAL_STATE: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
    """Two passes over one sequence and head, V block i_v (dS: gradient reaching S_t, from dht or 0).
    Reverse, t = T-1 .. 0:  dS += scale q_t do_t^T;  du_t = beta_t dS^T k_t;  dk_t = beta_t dS u_t;
                            dbeta_t = k_t^T dS u_t;  dS -= k_t du_t^T   (dS is now dS_{t-1}; at the end dS_0).
    Forward, t = 0 .. T-1, recomputing S from S_0 and the stored u:
                            dk_t -= S_{t-1} du_t;  S += k_t (beta_t u_t)^T;  dq_t = scale S_t do_t.
    dq, dk, dbeta are this V block's partials (summed over blocks on the host); du = dv is complete."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    ACC = du.dtype.element_ty
    scale = (tl.zeros([], dtype=ACC) + scale).to(ACC)  # scale arrives as float64 (exact for float64 inputs)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    part = i_v.to(tl.int64) * NTOK * H  # this V block's slice of the partial-sum buffers

    # pass 1: reverse in time, starting at the last token
    last = eos - 1
    p_q = q + (last * H + i_h) * K + o_k
    p_k = k + (last * H + i_h) * K + o_k
    p_u = u + (last * H + i_h) * V + o_v
    p_do = do + (last * H + i_h) * V + o_v
    p_du = du + (last * H + i_h) * V + o_v
    p_dk = dk + (part + last * H + i_h) * K + o_k
    p_beta = beta + last * H + i_h
    p_dbeta = dbeta + part + last * H + i_h
    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(dht + o_h, mask=m_h, other=0).to(ACC)
    t = bos
    while t < eos:  # (a while loop: the interpreter under numpy >= 2.4 cannot range() over loaded bounds)
        t += 1
        b_q = tl.load(p_q, mask=m_k, other=0).to(ACC)
        b_k = tl.load(p_k, mask=m_k, other=0).to(ACC)
        b_u = tl.load(p_u, mask=m_v, other=0).to(ACC)
        b_do = tl.load(p_do, mask=m_v, other=0).to(ACC)
        b_beta = tl.load(p_beta).to(ACC)
        b_dh += (scale * b_q)[:, None] * b_do[None, :]
        b_du = b_beta * tl.sum(b_dh * b_k[:, None], 0)
        b_dhu = tl.sum(b_dh * b_u[None, :], 1)
        b_dh -= b_k[:, None] * b_du[None, :]
        tl.store(p_du, b_du, mask=m_v)
        tl.store(p_dk, b_beta * b_dhu, mask=m_k)
        tl.store(p_dbeta, tl.sum(b_k * b_dhu, 0))
        p_q -= H * K
        p_k -= H * K
        p_u -= H * V
        p_do -= H * V
        p_du -= H * V
        p_dk -= H * K
        p_beta -= H
        p_dbeta -= H
    if STORE_DH0:
        tl.store(dh0 + o_h, b_dh.to(dh0.dtype.element_ty), mask=m_h)

    # du and dk of pass 1 (global memory) are read back below by other threads of this program
    tl.debug_barrier()

    # pass 2: forward in time
    p_k = k + (bos * H + i_h) * K + o_k
    p_u = u + (bos * H + i_h) * V + o_v
    p_do = do + (bos * H + i_h) * V + o_v
    p_du = du + (bos * H + i_h) * V + o_v
    p_dk = dk + (part + bos * H + i_h) * K + o_k
    p_dq = dq + (part + bos * H + i_h) * K + o_k
    p_beta = beta + bos * H + i_h
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0).to(ACC)
    t = bos
    while t < eos:  # (a while loop: the interpreter under numpy >= 2.4 cannot range() over loaded bounds)
        t += 1
        b_k = tl.load(p_k, mask=m_k, other=0).to(ACC)
        b_u = tl.load(p_u, mask=m_v, other=0).to(ACC)
        b_do = tl.load(p_do, mask=m_v, other=0).to(ACC)
        b_du = tl.load(p_du, mask=m_v, other=0).to(ACC)
        b_dk = tl.load(p_dk, mask=m_k, other=0).to(ACC)
        b_beta = tl.load(p_beta).to(ACC)
        tl.store(p_dk, b_dk - tl.sum(b_h * b_du[None, :], 1), mask=m_k)
        b_h += b_k[:, None] * (b_beta * b_u)[None, :]
        tl.store(p_dq, scale * tl.sum(b_h * b_do[None, :], 1), mask=m_k)
        p_k += H * K
        p_u += H * V
        p_do += H * V
        p_du += H * V
        p_dk += H * K
        p_dq += H * K
        p_beta += H


def fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets):
    """Returns (o [B, T, H, V] in q's dtype, u [B, T, H, V] accumulation dtype, final [N, H, K, V] or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = offsets.numel() - 1
    acc = acc_dtype(q.dtype)
    o = new_empty((B, T, H, V), q.dtype, q.device)
    u = new_empty((B, T, H, V), acc, q.device)
    ht = new_empty((N, H, K, V), acc, q.device) if output_final_state else None
    if B * T * H == 0:  # no tokens: the final state is the initial state
        if ht is not None and initial_state is not None:
            ht.copy_(initial_state)
        elif ht is not None:
            ht.zero_()
        return o, u, ht
    BK, BV, num_warps = _tiles(K, V, FWD_TILE, q.dtype)
    grid = (triton.cdiv(V, BV), N * H)
    _fwd_kernel[grid](q, k, v, beta, u, o, initial_state, ht, offsets, scale,
                      H=H, K=K, V=V, BK=BK, BV=BV,
                      USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=ht is not None,
                      num_warps=num_warps)
    return o, u, ht


def fused_recurrent_delta_rule_bwd(q, k, u, beta, scale, initial_state, do, dht, offsets, need_dh0):
    """Returns (dq, dk, dv, dbeta, dh0 or None); dh0 in the accumulation dtype."""
    B, T, H, K = q.shape
    V = u.shape[-1]
    N = offsets.numel() - 1
    acc = acc_dtype(q.dtype)
    dh0 = new_empty((N, H, K, V), acc, q.device) if need_dh0 else None
    if B * T * H == 0:
        if dh0 is not None and dht is not None:
            dh0.copy_(dht)
        elif dh0 is not None:
            dh0.zero_()
        return (new_empty(q.shape, acc, q.device), new_empty(k.shape, acc, q.device),
                new_empty(u.shape, acc, q.device), new_empty(beta.shape, acc, q.device), dh0)
    BK, BV, num_warps = _tiles(K, V, BWD_TILE, q.dtype)
    NV = triton.cdiv(V, BV)
    du = new_empty((B, T, H, V), acc, q.device)
    dq = new_empty((NV, B, T, H, K), acc, q.device)
    dk = new_empty((NV, B, T, H, K), acc, q.device)
    dbeta = new_empty((NV, B, T, H), acc, q.device)
    _bwd_kernel[(NV, N * H)](q, k, beta, u, do, dht, initial_state, dh0, du, dq, dk, dbeta, offsets, scale, B * T,
                             H=H, K=K, V=V, BK=BK, BV=BV,
                             USE_INITIAL_STATE=initial_state is not None, USE_DHT=dht is not None,
                             STORE_DH0=dh0 is not None, num_warps=num_warps)
    if NV == 1:
        return dq[0], dk[0], du, dbeta[0], dh0
    return dq.sum(0), dk.sum(0), du, dbeta.sum(0), dh0


class FusedRecurrentDeltaRuleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, offsets):
        o, u, ht = fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets)
        ctx.save_for_backward(q, k, u, beta, initial_state, offsets)
        ctx.scale = scale
        ctx.v_dtype = v.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, u, beta, initial_state, offsets = ctx.saved_tensors
        if do is None:
            do = torch.zeros(u.shape, dtype=q.dtype, device=q.device)
        need_dh0 = initial_state is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dbeta, dh0 = fused_recurrent_delta_rule_bwd(
            q, k, u, beta, ctx.scale, initial_state, do.contiguous(),
            None if dht is None else dht.contiguous(), offsets, need_dh0)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(ctx.v_dtype), dbeta.to(beta.dtype), None,
                None if dh0 is None else dh0.to(initial_state.dtype), None, None)


def fused_recurrent_delta_rule(q, k, v, beta=None, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None, use_qk_l2norm_in_kernel=False):
    """The delta rule token by token (fla 0.6.0's fused_recurrent_delta_rule).

    q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] (None: all ones), scale (default K^-1/2),
    initial_state [N, H, K, V], cu_seqlens int [N + 1] packing N sequences along T (B must be 1).
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in float32 (float64 for float64 inputs)
    or None). Differentiable in q, k, v, beta and initial_state (and through the final state)."""
    B, T, H, K, V = check_qkv(q, k, v)
    if beta is None:
        beta = torch.ones(B, T, H, dtype=q.dtype, device=q.device)
    check_tensor("beta", beta, shape=(B, T, H), device=q.device)
    N = check_cu_seqlens(cu_seqlens, B, T, q.device)
    check_state(initial_state, N, H, K, V, q.device)
    scale = default_scale(scale, K)
    if use_qk_l2norm_in_kernel:
        from ops.common.l2norm import l2norm
        q, k = l2norm(q), l2norm(k)
    offsets = sequence_offsets(cu_seqlens, B, T, q.device)
    return FusedRecurrentDeltaRuleFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), scale,
        None if initial_state is None else initial_state.contiguous(), bool(output_final_state), offsets)
