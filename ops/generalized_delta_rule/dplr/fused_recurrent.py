"""The DPLR delta rule token by token (inference / decode form), forward and backward in Triton
(IPLR: USE_GK=False, no decay loads and no gk gradient).

Per sequence and head, state S [K, V] (S_0 the initial state, or zeros):
    w_t = S_{t-1}^T a_t,   S_t = exp(gk_t) * S_{t-1} + b_t w_t^T + k_t v_t^T,   o_t = scale S_t^T q_t
(exp(gk_t) scales the rows of S). Each program keeps all K rows and a block of BV columns of S in registers; the
grid is (cdiv(V, BV), N * H). Columns of S evolve independently, so V blocks never communicate; the gradients
that sum over V (dq, dk, da, db, dgk) are written as per-block partials [NV, ...] and summed on the host.

Backward. S_{t-1} cannot be recovered from S_t (the transition may be singular and decays underflow), so the
forward also stores S at the start of every segment of CK = 64 tokens (checkpoints, [NC, H, K, V], accumulation
dtype). The backward walks each sequence's segments from the last: it recomputes the segment's states from its
checkpoint into a scratch buffer (S_{t-1} for its tokens, computing dq_t = scale S_t do_t on the way), then runs
the reverse recurrence over the segment, with dS the gradient reaching S_t (dht at the end, or 0):
    dS += scale q_t do_t^T;   dk_t = dS v_t;   dv_t = dS^T k_t;   db_t = dS w_t   (w_t = S_{t-1}^T a_t);
    u = dS^T b_t;   da_t = S_{t-1} u;   dgk_t = exp(gk_t) * rowsum(dS * S_{t-1});
    dS <- exp(gk_t) * dS + a_t u^T   (now the gradient reaching S_{t-1}; at the start of a sequence, dS_0).
Work O(T K V) (the forward recurrence runs twice); extra memory: checkpoints NC*H*K*V plus the scratch
N*H*CK*BK*NV*BV (= N*H*64*K*V elements for power-of-two sizes, e.g. 256 MiB in float32 for N*H = 64,
K = V = 128), in the accumulation dtype.
"""
import torch
import triton
import triton.language as tl

from ops.common.compile_ahead import first_call
from ops.common.utils import acc_dtype, chunk_index, new_empty, on_device, scale_arg
from ops.generalized_delta_rule.utils import check_inputs, state_tile

CK = 64  # tokens per checkpointed segment

# State-tile budgets (elements of the accumulation dtype per program). The forward keeps its tile small, so
# decode (T = 1, few heads) gets several programs per head; the backward keeps V blocks wide (fewer partials).
FWD_TILE = 2048
BWD_TILE = 8192


@triton.jit
def _fwd_kernel(q, k, v, a, b, gk, o, h0, ht, ckpt, offsets, chunk_offsets, scale_ptr,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                CK: tl.constexpr, USE_GK: tl.constexpr, USE_S0: tl.constexpr, STORE_FINAL: tl.constexpr,
                STORE_CKPT: tl.constexpr):
    """For t in the sequence: w = S^T a_t; S = exp(gk_t) S + b_t w^T + k_t v_t^T; o_t = scale S^T q_t.
    Stores o, the final state when asked, and S at the start of every CK-token segment when asked."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    ACC = scale_ptr.dtype.element_ty  # the scale arrives in the accumulation dtype
    scale = tl.load(scale_ptr)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_S0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0).to(ACC)

    if STORE_CKPT:
        p_ck = ckpt + (tl.load(chunk_offsets + i_n).to(tl.int64) * H + i_h) * K * V + o_h
    t = bos
    while t < eos:  # (while loops: the interpreter cannot range() over loaded bounds)
        if STORE_CKPT:
            if (t - bos) % CK == 0:
                tl.store(p_ck, b_h, mask=m_h)
                p_ck += H * K * V
        p = (t * H + i_h) * K + o_k
        b_q = tl.load(q + p, mask=m_k, other=0).to(ACC)
        b_k = tl.load(k + p, mask=m_k, other=0).to(ACC)
        b_a = tl.load(a + p, mask=m_k, other=0).to(ACC)
        b_b = tl.load(b + p, mask=m_k, other=0).to(ACC)
        b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(ACC)
        b_w = tl.sum(b_h * b_a[:, None], 0)
        if USE_GK:
            b_h *= tl.exp(tl.load(gk + p, mask=m_k, other=0).to(ACC))[:, None]
        b_h += b_b[:, None] * b_w[None, :] + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_h * b_q[:, None], 0) * scale
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
        t += 1
    if STORE_FINAL:
        tl.store(ht + i_nh.to(tl.int64) * K * V + o_h, b_h, mask=m_h)


@triton.jit
def _bwd_kernel(q, k, v, a, b, gk, do, dht, ckpt, scratch, dq, dk, dv, da, db, dgk, dh0, offsets, chunk_offsets,
                scale_ptr, NTOK,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                CK: tl.constexpr, USE_GK: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr):
    """Segments of CK tokens from the last: recompute S_{t-1} into scratch (and dq), then the reverse pass.
    dq, dk, da, db, dgk are this V block's partials; dv is complete."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)
    ACC = scale_ptr.dtype.element_ty  # the scale arrives in the accumulation dtype
    scale = tl.load(scale_ptr)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = o_k[:, None] * V + o_v[None, :]
    o_s = o_k[:, None] * BV + tl.arange(0, BV)[None, :]  # a [BK, BV] scratch slot
    p_scr = scratch + (i_nh.to(tl.int64) * tl.num_programs(0) + i_v) * CK * BK * BV
    part = i_v.to(tl.int64) * NTOK * H  # this V block's slice of the partial-sum buffers
    c0 = tl.load(chunk_offsets + i_n).to(tl.int64)

    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(dht + i_nh.to(tl.int64) * K * V + o_h, mask=m_h, other=0).to(ACC)
    n_seg = (eos - bos + CK - 1) // CK
    while n_seg > 0:
        n_seg -= 1
        s0 = bos + n_seg * CK
        s1 = tl.minimum(s0 + CK, eos)
        # recompute the segment: scratch[t - s0] = S_{t-1}; dq_t = scale S_t do_t
        b_h = tl.load(ckpt + ((c0 + n_seg) * H + i_h) * K * V + o_h, mask=m_h, other=0)
        t = s0
        while t < s1:
            tl.store(p_scr + (t - s0) * BK * BV + o_s, b_h)
            p = (t * H + i_h) * K + o_k
            b_k = tl.load(k + p, mask=m_k, other=0).to(ACC)
            b_a = tl.load(a + p, mask=m_k, other=0).to(ACC)
            b_b = tl.load(b + p, mask=m_k, other=0).to(ACC)
            b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(ACC)
            b_do = tl.load(do + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(ACC)
            b_w = tl.sum(b_h * b_a[:, None], 0)
            if USE_GK:
                b_h *= tl.exp(tl.load(gk + p, mask=m_k, other=0).to(ACC))[:, None]
            b_h += b_b[:, None] * b_w[None, :] + b_k[:, None] * b_v[None, :]
            tl.store(dq + part * K + p, scale * tl.sum(b_h * b_do[None, :], 1), mask=m_k)
            t += 1
        tl.debug_barrier()  # the scratch written above is read below by other threads of this program
        # reverse pass over the segment
        t = s1
        while t > s0:
            t -= 1
            b_hp = tl.load(p_scr + (t - s0) * BK * BV + o_s)
            p = (t * H + i_h) * K + o_k
            b_q = tl.load(q + p, mask=m_k, other=0).to(ACC)
            b_k = tl.load(k + p, mask=m_k, other=0).to(ACC)
            b_a = tl.load(a + p, mask=m_k, other=0).to(ACC)
            b_b = tl.load(b + p, mask=m_k, other=0).to(ACC)
            b_v = tl.load(v + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(ACC)
            b_do = tl.load(do + (t * H + i_h) * V + o_v, mask=m_v, other=0).to(ACC)
            b_dh += (scale * b_q)[:, None] * b_do[None, :]
            b_w = tl.sum(b_hp * b_a[:, None], 0)
            b_u = tl.sum(b_dh * b_b[:, None], 0)
            tl.store(dk + part * K + p, tl.sum(b_dh * b_v[None, :], 1), mask=m_k)
            tl.store(db + part * K + p, tl.sum(b_dh * b_w[None, :], 1), mask=m_k)
            tl.store(da + part * K + p, tl.sum(b_hp * b_u[None, :], 1), mask=m_k)
            p_dv = dv + (t * H + i_h) * V + o_v
            tl.store(p_dv, tl.sum(b_dh * b_k[:, None], 0).to(p_dv.dtype.element_ty), mask=m_v)
            if USE_GK:
                b_eg = tl.exp(tl.load(gk + p, mask=m_k, other=0).to(ACC))
                tl.store(dgk + part * K + p, b_eg * tl.sum(b_dh * b_hp, 1), mask=m_k)
                b_dh *= b_eg[:, None]
            b_dh += b_a[:, None] * b_u[None, :]
        tl.debug_barrier()  # the next segment overwrites the scratch
    if STORE_DH0:
        p0 = dh0 + i_nh.to(tl.int64) * K * V + o_h
        tl.store(p0, b_dh.to(p0.dtype.element_ty), mask=m_h)


def _num_warps(BK, BV):
    return max(1, min(8, BK * BV // 1024))


def fused_recurrent_dplr_fwd(q, k, v, a, b, gk, scale_t, initial_state, output_final_state, offsets,
                             chunk_offsets, NC, store_ckpt):
    """Returns (o, final state or None, checkpoints [NC, H, K, V] or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = offsets.numel() - 1
    acc = acc_dtype(q.dtype)
    o = new_empty((B, T, H, V), q.dtype, q.device)
    ht = new_empty((N, H, K, V), acc, q.device) if output_final_state else None
    ckpt = new_empty((NC, H, K, V), acc, q.device) if store_ckpt else None
    if N * H == 0:
        return o, ht, ckpt
    BK, BV = state_tile(K, V, FWD_TILE, q.dtype, min_v=8)
    _fwd_kernel[(triton.cdiv(V, BV), N * H)](
        q, k, v, a, b, gk, o, initial_state, ht, ckpt, offsets, chunk_offsets, scale_t, H=H, K=K, V=V, BK=BK, BV=BV,
        CK=CK, USE_GK=gk is not None, USE_S0=initial_state is not None, STORE_FINAL=ht is not None,
        STORE_CKPT=ckpt is not None, num_warps=_num_warps(BK, BV))
    return o, ht, ckpt


def fused_recurrent_dplr_bwd(q, k, v, a, b, gk, scale_t, initial_state, ckpt, do, dht, offsets, chunk_offsets):
    """Returns dq, dk, dv, da, db (input dtype), dgk (gk's dtype, None without gk), dS0 (initial_state's dtype,
    None without initial_state)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = offsets.numel() - 1
    acc = acc_dtype(q.dtype)
    BK, BV = state_tile(K, V, BWD_TILE, q.dtype, min_v=8)
    NV = triton.cdiv(V, BV)
    names = ("q", "k", "a", "b") + (("gk",) if gk is not None else ())
    parts = {n: new_empty((NV, B, T, H, K), acc, q.device) for n in names}
    dv = new_empty(v.shape, v.dtype, q.device)
    dh0 = None if initial_state is None else new_empty(initial_state.shape, initial_state.dtype, q.device)
    if N * H:
        scratch = new_empty((N * H * NV, CK, BK, BV), acc, q.device)
        _bwd_kernel[(NV, N * H)](
            q, k, v, a, b, gk, do, dht, ckpt, scratch, parts["q"], parts["k"], dv, parts["a"], parts["b"],
            parts.get("gk"), dh0, offsets, chunk_offsets, scale_t, B * T, H=H, K=K, V=V, BK=BK, BV=BV, CK=CK,
            USE_GK=gk is not None, USE_DHT=dht is not None, STORE_DH0=dh0 is not None,
            num_warps=_num_warps(BK, BV))
    grads = {n: (x[0] if NV == 1 else x.sum(0)) for n, x in parts.items()}
    out = [grads[n].to(x.dtype) for n, x in (("q", q), ("k", k))]
    out += [dv] + [grads[n].to(x.dtype) for n, x in (("a", a), ("b", b))]
    out += [None if gk is None else grads["gk"].to(gk.dtype), dh0]
    return out


class FusedRecurrentDPLRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens):
        B, T = q.shape[:2]
        q, k, v, a, b = (x.contiguous() for x in (q, k, v, a, b))
        gk = None if gk is None else gk.contiguous()
        initial_state = None if initial_state is None else initial_state.contiguous()
        with on_device(q.device):
            offsets, _, chunk_offsets, NC = chunk_index(cu_seqlens, B, T, CK, q.device)
            scale_t = scale_arg(scale, q.dtype, q.device)
            store_ckpt = any(ctx.needs_input_grad)
            o, ht, ckpt = fused_recurrent_dplr_fwd(q, k, v, a, b, gk, scale_t, initial_state, output_final_state,
                                                   offsets, chunk_offsets, NC, store_ckpt)
        ctx.save_for_backward(q, k, v, a, b, gk, initial_state, scale_t, offsets, chunk_offsets, ckpt)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, gk, initial_state, scale_t, offsets, chunk_offsets, ckpt = ctx.saved_tensors
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        with on_device(q.device):
            dq, dk, dv, da, db, dgk, dh0 = fused_recurrent_dplr_bwd(q, k, v, a, b, gk, scale_t, initial_state, ckpt,
                                                                    do, dht, offsets, chunk_offsets)
        return dq, dk, dv, da, db, dgk, None, dh0, None, None


@first_call
def fused_recurrent_dplr_delta_rule(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False,
                                    cu_seqlens=None):
    """The DPLR delta rule token by token (fla 0.6.0's fused_recurrent_dplr_delta_rule).

    S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,  o_t = scale S_t^T q_t.
    q, k, a, b, gk [B, T, H, K], v [B, T, H, V] (one dtype; gk may also be float32), scale (default K^-1/2),
    initial_state [N, H, K, V], cu_seqlens int [N + 1] packing N sequences along T (B must be 1).
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in float32 (float64 for float64 inputs)
    or None). Differentiable in q, k, v, a, b, gk and initial_state. Any decay gk <= 0 is safe."""
    if gk is None:
        raise TypeError("gk must be a torch.Tensor, got NoneType (use fused_recurrent_iplr_delta_rule for no decay)")
    *_, scale = check_inputs(q, k, v, a, b, gk, scale, initial_state, cu_seqlens)
    return FusedRecurrentDPLRFunction.apply(q, k, v, a, b, gk, scale, initial_state, bool(output_final_state),
                                            cu_seqlens)
