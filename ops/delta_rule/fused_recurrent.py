"""The delta rule token by token (the inference / decode form), forward and backward in Triton.

Per sequence and head, with state S [K, V] (S_0 the initial state, or zeros):

    u_t = v_t - S_{t-1}^T k_t,    S_t = S_{t-1} + beta_t k_t u_t^T,    o_t = scale S_t^T q_t

which is S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. Each program keeps a [BK, BV] slice of S (all of
K, a block of V columns) in registers; the grid is (cdiv(V, BV), N * H). Columns of S evolve independently, so the
forward needs no communication between V blocks; the backward's dq, dk, dbeta sum over V and are written as
per-block partials [NV, ...] and summed on the host.
"""
import os

import torch
import triton
import triton.language as tl

from ops.common import utils
from ops.common.compile_ahead import first_call
from ops.common.utils import (
    acc_dtype,
    block_size,
    check_cu_seqlens,
    check_qkv,
    check_state,
    check_tensor,
    default_scale,
    interpreting,
    new_empty,
    sequence_offsets,
    tl_acc,
)
from ops.delta_rule.chunk import chunk_delta_rule_bwd, chunk_delta_rule_states

# State-tile budgets (elements of the accumulation dtype per program; halved for float64). The per-token chain
# is latency bound, so tiles stay small and programs many: the forward runs a [BK, <=2048/BK] tile on one warp
# (the decode path, T = 1, streams the state within a few percent of its best this way, H100); the backward a
# [BK, <=1024/BK] tile on one warp. H200, bf16, B=8, T=4096, H=16, K=V=128 (benchmarks.tune_launch --forms
# fused_recurrent): backward kernel 18.5 ms at 1024 ([128, 8], 116 registers, no spills), 29.8 ms at 4096
# ([128, 32] on 4 warps). DELTACHECK_FUSED_RECURRENT_BWD_TILE=N sets another budget.
FWD_TILE = 2048
BWD_TILE = int(os.environ.get("DELTACHECK_FUSED_RECURRENT_BWD_TILE", "1024"))

# The backward: "recurrent", the two token-by-token passes below (its dq, dk, dbeta are written per V block as
# [NV, B, T, H, K] float32 partials: at B=8, T=4096, H=16, K=V=128 and [128, 8] tiles 4.3 GB each, summed on the
# host), or "chunk": the same gradients from the chunkwise form (ops.delta_rule.chunk: its WY stage and state pass
# recomputed from q, k, v, beta, then its backward kernels), with no per-token state pass and no partials.
# "chunk" is the default: fwd+bwd at that shape 24.4 -> 5.4 ms (H200, visit 13; fla 35.1).
BACKWARDS = ("recurrent", "chunk")
BACKWARD = os.environ.get("DELTACHECK_FUSED_RECURRENT_BWD", "chunk")
BWD_CHUNK = 64  # the chunk backward's chunk size


def _tiles(K: int, V: int, dtype: torch.dtype, backward: bool):
    """(BK, BV, num_warps): all of K in one tile, V in blocks of BV."""
    tile = BWD_TILE if backward else FWD_TILE
    budget = tile // (2 if dtype == torch.float64 else 1)
    BK = block_size(K)
    min_v = 8 if tile >= 1024 else 4  # a budget below the defaults may take [BK, 4] tiles (tune_launch's 512)
    BV = min(block_size(V, minimum=min_v), max(min_v, budget // BK))
    if not backward:
        return BK, BV, 1
    BV = min(BV, 32)
    return BK, BV, max(1, min(8, BK * BV // 1024))


# Loops run over a sequence's tokens [bos, eos) loaded from `offsets`. Each step first issues the loads of the next
# token (masked off past the end), which then overlap the current token's state update (2.3x on an H100 over
# loading in step). A for loop is the faster form on the GPU (about 20% in the backward), but the interpreter (under
# numpy >= 2.4) cannot range() over loaded bounds, so there the same step runs in a while loop (LOOP_WHILE).

@triton.jit
def _load_fwd_token(q, k, v, beta, x, valid, i_h, o_k, o_v, m_k, m_v, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr):
    r = x * H + i_h
    return (tl.load(q + r * K + o_k, mask=m_k & valid, other=0), tl.load(k + r * K + o_k, mask=m_k & valid, other=0),
            tl.load(v + r * V + o_v, mask=m_v & valid, other=0), tl.load(beta + r, mask=valid, other=0))


@triton.jit
def _fwd_step(t, eos, b_h, n_q, n_k, n_v, n_beta, q, k, v, beta, u, o, scale, i_h, o_k, o_v, m_k, m_v,
              H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, STORE_U: tl.constexpr):
    """Step t in (bos, eos]: token x = t - 1 (inputs n_* loaded a step ahead):
    u = v - S^T k;  S += k (beta u)^T;  o = scale S^T q.  Returns S and token t's inputs."""
    ACC = b_h.dtype
    b_q, b_k, b_v, b_beta = n_q.to(ACC), n_k.to(ACC), n_v.to(ACC), n_beta.to(ACC)
    n_q, n_k, n_v, n_beta = _load_fwd_token(q, k, v, beta, t, t < eos, i_h, o_k, o_v, m_k, m_v, H, K, V)
    b_u = b_v - tl.sum(b_h * b_k[:, None], 0)
    b_h += b_k[:, None] * (b_beta * b_u)[None, :]
    b_o = tl.sum(b_h * b_q[:, None], 0) * scale
    r = (t - 1) * H + i_h
    if STORE_U:
        tl.store(u + r * V + o_v, b_u, mask=m_v)
    tl.store(o + r * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    return b_h, n_q, n_k, n_v, n_beta


@triton.jit
def _fwd_kernel(q, k, v, beta, u, o, h0, ht, offsets, scale: tl.float64,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, STORE_U: tl.constexpr,
                ACC: tl.constexpr, LOOP_WHILE: tl.constexpr):
    """One sequence and head, V columns of block i_v; for each token: u_t = v_t - S^T k_t; S += k_t (beta_t u_t)^T;
    o_t = scale S^T q_t. Stores o, u (accumulation dtype, for the backward) and the final S when asked."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    scale = (tl.zeros([], dtype=ACC) + scale).to(ACC)  # scale arrives as float64 (exact for float64 inputs)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0).to(ACC)
    n_q, n_k, n_v, n_beta = _load_fwd_token(q, k, v, beta, bos, bos < eos, i_h, o_k, o_v, m_k, m_v, H, K, V)
    if LOOP_WHILE:
        t = bos
        while t < eos:
            t += 1
            b_h, n_q, n_k, n_v, n_beta = _fwd_step(t, eos, b_h, n_q, n_k, n_v, n_beta, q, k, v, beta, u, o, scale,
                                                   i_h, o_k, o_v, m_k, m_v, H, K, V, STORE_U)
    else:
        for t in range(bos + 1, eos + 1):
            b_h, n_q, n_k, n_v, n_beta = _fwd_step(t, eos, b_h, n_q, n_k, n_v, n_beta, q, k, v, beta, u, o, scale,
                                                   i_h, o_k, o_v, m_k, m_v, H, K, V, STORE_U)
    if STORE_FINAL_STATE:
        tl.store(ht + o_h, b_h.to(ht.dtype.element_ty), mask=m_h)


@triton.jit
def _load_bwd_token(k, u, do, beta, x, valid, i_h, o_k, o_v, m_k, m_v, H: tl.constexpr, K: tl.constexpr,
                    V: tl.constexpr):
    r = x * H + i_h
    return (tl.load(k + r * K + o_k, mask=m_k & valid, other=0), tl.load(u + r * V + o_v, mask=m_v & valid, other=0),
            tl.load(do + r * V + o_v, mask=m_v & valid, other=0), tl.load(beta + r, mask=valid, other=0))


@triton.jit
def _bwd_reverse_step(t, bos, eos, b_dh, n_q, n_k, n_u, n_do, n_beta, q, k, u, do, beta, du, dk, dbeta, part,
                      scale, i_h, o_k, o_v, m_k, m_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Step t in (bos, eos]: token x = bos + eos - t, from the last down to the first (inputs loaded a step ahead):
    dS += scale q do^T;  du = beta dS^T k;  dk = beta dS u;  dbeta = k^T dS u;  dS -= k du^T."""
    ACC = b_dh.dtype
    b_q, b_k, b_u, b_do, b_beta = n_q.to(ACC), n_k.to(ACC), n_u.to(ACC), n_do.to(ACC), n_beta.to(ACC)
    x = bos + eos - t
    n_k, n_u, n_do, n_beta = _load_bwd_token(k, u, do, beta, x - 1, t < eos, i_h, o_k, o_v, m_k, m_v, H, K, V)
    n_q = tl.load(q + ((x - 1) * H + i_h) * K + o_k, mask=m_k & (t < eos), other=0)
    b_dh += (scale * b_q)[:, None] * b_do[None, :]
    b_du = b_beta * tl.sum(b_dh * b_k[:, None], 0)
    b_dhu = tl.sum(b_dh * b_u[None, :], 1)
    b_dh -= b_k[:, None] * b_du[None, :]
    r = x * H + i_h
    tl.store(du + r * V + o_v, b_du, mask=m_v)
    tl.store(dk + (part + r) * K + o_k, b_beta * b_dhu, mask=m_k)
    tl.store(dbeta + part + r, tl.sum(b_k * b_dhu, 0))
    return b_dh, n_q, n_k, n_u, n_do, n_beta


@triton.jit
def _bwd_forward_step(t, eos, b_h, n_k, n_u, n_do, n_beta, n_du, n_dk, k, u, do, beta, du, dk, dq, part, scale,
                      i_h, o_k, o_v, m_k, m_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr):
    """Step t in (bos, eos]: token x = t - 1 (inputs loaded a step ahead), S = S_{x-1} recomputed:
    dk -= S du;  S += k (beta u)^T;  dq = scale S do."""
    ACC = b_h.dtype
    b_k, b_u, b_do, b_beta = n_k.to(ACC), n_u.to(ACC), n_do.to(ACC), n_beta.to(ACC)
    b_du, b_dk = n_du.to(ACC), n_dk.to(ACC)
    n_k, n_u, n_do, n_beta = _load_bwd_token(k, u, do, beta, t, t < eos, i_h, o_k, o_v, m_k, m_v, H, K, V)
    n_du = tl.load(du + (t * H + i_h) * V + o_v, mask=m_v & (t < eos), other=0)
    n_dk = tl.load(dk + (part + t * H + i_h) * K + o_k, mask=m_k & (t < eos), other=0)
    r = (t - 1) * H + i_h
    tl.store(dk + (part + r) * K + o_k, b_dk - tl.sum(b_h * b_du[None, :], 1), mask=m_k)
    b_h += b_k[:, None] * (b_beta * b_u)[None, :]
    tl.store(dq + (part + r) * K + o_k, scale * tl.sum(b_h * b_do[None, :], 1), mask=m_k)
    return b_h, n_k, n_u, n_do, n_beta, n_du, n_dk


@triton.jit
def _bwd_kernel(q, k, beta, u, do, dht, h0, dh0, du, dq, dk, dbeta, offsets, scale: tl.float64, NTOK,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                USE_INITIAL_STATE: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                ACC: tl.constexpr, LOOP_WHILE: tl.constexpr):
    """Two passes over one sequence and head, V block i_v (dS: gradient reaching S_t, from dht or 0).
    Reverse, t = T-1 .. 0:  dS += scale q_t do_t^T;  du_t = beta_t dS^T k_t;  dk_t = beta_t dS u_t;
                            dbeta_t = k_t^T dS u_t;  dS -= k_t du_t^T   (dS is now dS_{t-1}; at the end dS_0).
    Forward, t = 0 .. T-1, recomputing S from S_0 and the stored u:
                            dk_t -= S_{t-1} du_t;  S += k_t (beta_t u_t)^T;  dq_t = scale S_t do_t.
    dq, dk, dbeta are this V block's partials (summed over blocks on the host); du = dv is complete."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    scale = (tl.zeros([], dtype=ACC) + scale).to(ACC)  # scale arrives as float64 (exact for float64 inputs)
    bos = tl.load(offsets + i_n).to(tl.int64)
    eos = tl.load(offsets + i_n + 1).to(tl.int64)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_h = m_k[:, None] & m_v[None, :]
    o_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    part = i_v.to(tl.int64) * NTOK * H  # this V block's slice of the partial-sum buffers

    # pass 1: reverse in time
    b_dh = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        b_dh += tl.load(dht + o_h, mask=m_h, other=0).to(ACC)
    n_k, n_u, n_do, n_beta = _load_bwd_token(k, u, do, beta, eos - 1, bos < eos, i_h, o_k, o_v, m_k, m_v, H, K, V)
    n_q = tl.load(q + ((eos - 1) * H + i_h) * K + o_k, mask=m_k & (bos < eos), other=0)
    if LOOP_WHILE:
        t = bos
        while t < eos:
            t += 1
            b_dh, n_q, n_k, n_u, n_do, n_beta = _bwd_reverse_step(
                t, bos, eos, b_dh, n_q, n_k, n_u, n_do, n_beta, q, k, u, do, beta, du, dk, dbeta, part, scale,
                i_h, o_k, o_v, m_k, m_v, H, K, V)
    else:
        for t in range(bos + 1, eos + 1):
            b_dh, n_q, n_k, n_u, n_do, n_beta = _bwd_reverse_step(
                t, bos, eos, b_dh, n_q, n_k, n_u, n_do, n_beta, q, k, u, do, beta, du, dk, dbeta, part, scale,
                i_h, o_k, o_v, m_k, m_v, H, K, V)
    if STORE_DH0:
        tl.store(dh0 + o_h, b_dh.to(dh0.dtype.element_ty), mask=m_h)

    # du and dk of pass 1 (global memory) are read back below by other threads of this program
    tl.debug_barrier()

    # pass 2: forward in time
    b_h = tl.zeros([BK, BV], dtype=ACC)
    if USE_INITIAL_STATE:
        b_h += tl.load(h0 + o_h, mask=m_h, other=0).to(ACC)
    n_k, n_u, n_do, n_beta = _load_bwd_token(k, u, do, beta, bos, bos < eos, i_h, o_k, o_v, m_k, m_v, H, K, V)
    n_du = tl.load(du + (bos * H + i_h) * V + o_v, mask=m_v & (bos < eos), other=0)
    n_dk = tl.load(dk + (part + bos * H + i_h) * K + o_k, mask=m_k & (bos < eos), other=0)
    if LOOP_WHILE:
        t = bos
        while t < eos:
            t += 1
            b_h, n_k, n_u, n_do, n_beta, n_du, n_dk = _bwd_forward_step(
                t, eos, b_h, n_k, n_u, n_do, n_beta, n_du, n_dk, k, u, do, beta, du, dk, dq, part, scale,
                i_h, o_k, o_v, m_k, m_v, H, K, V)
    else:
        for t in range(bos + 1, eos + 1):
            b_h, n_k, n_u, n_do, n_beta, n_du, n_dk = _bwd_forward_step(
                t, eos, b_h, n_k, n_u, n_do, n_beta, n_du, n_dk, k, u, do, beta, du, dk, dq, part, scale,
                i_h, o_k, o_v, m_k, m_v, H, K, V)




def fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets, store_u=True):
    """Returns (o [B, T, H, V] in q's dtype, u [B, T, H, V] accumulation dtype or None (store_u=False: no
    backward will follow), final state [N, H, K, V] or None)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = offsets.numel() - 1
    acc = acc_dtype(q.dtype)
    o = new_empty((B, T, H, V), q.dtype, q.device)
    u = new_empty((B, T, H, V), acc, q.device) if store_u else None
    ht = new_empty((N, H, K, V), acc, q.device) if output_final_state else None
    if B * T * H == 0:  # no tokens: the final state is the initial state
        if ht is not None and initial_state is not None:
            ht.copy_(initial_state)
        elif ht is not None:
            ht.zero_()
        return o, u, ht
    BK, BV, num_warps = _tiles(K, V, q.dtype, backward=False)
    grid = (triton.cdiv(V, BV), N * H)
    _fwd_kernel[grid](q, k, v, beta, u, o, initial_state, ht, offsets, scale,
                      H=H, K=K, V=V, BK=BK, BV=BV,
                      USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=ht is not None,
                      STORE_U=store_u, ACC=tl_acc(acc), LOOP_WHILE=interpreting(), num_warps=num_warps)
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
    BK, BV, num_warps = _tiles(K, V, q.dtype, backward=True)
    NV = triton.cdiv(V, BV)
    du = new_empty((B, T, H, V), acc, q.device)
    dq = new_empty((NV, B, T, H, K), acc, q.device)
    dk = new_empty((NV, B, T, H, K), acc, q.device)
    dbeta = new_empty((NV, B, T, H), acc, q.device)
    _bwd_kernel[(NV, N * H)](q, k, beta, u, do, dht, initial_state, dh0, du, dq, dk, dbeta, offsets, scale, B * T,
                             H=H, K=K, V=V, BK=BK, BV=BV,
                             USE_INITIAL_STATE=initial_state is not None, USE_DHT=dht is not None,
                             STORE_DH0=dh0 is not None, ACC=tl_acc(acc), LOOP_WHILE=interpreting(),
                             num_warps=num_warps)
    if NV == 1:
        return dq[0], dk[0], du, dbeta[0], dh0
    return dq.sum(0), dk.sum(0), du, dbeta.sum(0), dh0


def chunk_backward(q, k, v, beta, scale, initial_state, do, dht, offsets, packed):
    """The backward from the chunkwise form: (dq, dk, dv, dbeta, dh0 or None) in the inputs' dtypes. packed: the
    sequences come from cu_seqlens (offsets), else B sequences of T tokens."""
    B, T = q.shape[:2]
    with utils.on_device(q.device):
        idx = utils.chunk_index(offsets if packed else None, B, T, BWD_CHUNK, q.device)
        saved, _, _ = chunk_delta_rule_states(k, v, beta, initial_state, False, idx, BWD_CHUNK)
        return chunk_delta_rule_bwd(q, k, v, beta, utils.scale_arg(scale, q.dtype, q.device), initial_state, do,
                                    dht, saved, idx, BWD_CHUNK)


class FusedRecurrentDeltaRuleFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, beta, scale, initial_state, output_final_state, offsets, packed):
        if BACKWARD not in BACKWARDS:
            raise ValueError(f"DELTACHECK_FUSED_RECURRENT_BWD must be one of {BACKWARDS}, got {BACKWARD!r}")
        ctx.chunk = BACKWARD == "chunk" and q.numel() > 0
        o, u, ht = fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets,
                                                  store_u=not ctx.chunk)
        ctx.save_for_backward(q, k, v if ctx.chunk else u, beta, initial_state, offsets)
        ctx.scale, ctx.packed = scale, packed
        ctx.v_dtype = v.dtype
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, vu, beta, initial_state, offsets = ctx.saved_tensors
        if do is None:
            do = torch.zeros(vu.shape, dtype=q.dtype, device=q.device)
        need_dh0 = initial_state is not None and ctx.needs_input_grad[5]
        do, dht = do.contiguous(), None if dht is None else dht.contiguous()
        if ctx.chunk:
            dq, dk, dv, dbeta, dh0 = chunk_backward(q, k, vu, beta, ctx.scale, initial_state, do, dht, offsets,
                                                    ctx.packed)
            return dq, dk, dv, dbeta, None, dh0 if need_dh0 else None, None, None, None
        dq, dk, dv, dbeta, dh0 = fused_recurrent_delta_rule_bwd(
            q, k, vu, beta, ctx.scale, initial_state, do, dht, offsets, need_dh0)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(ctx.v_dtype), dbeta.to(beta.dtype), None,
                None if dh0 is None else dh0.to(initial_state.dtype), None, None, None)


@first_call
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
    q, k, v, beta = q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous()
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                            for x in (q, k, v, beta, initial_state))):
        # inference (decode): no autograd node, and no u to keep for a backward
        o, _, ht = fused_recurrent_delta_rule_fwd(q, k, v, beta, scale, initial_state, output_final_state, offsets,
                                                  store_u=False)
        return o, ht
    return FusedRecurrentDeltaRuleFunction.apply(q, k, v, beta, scale, initial_state, bool(output_final_state),
                                                 offsets, cu_seqlens is not None)
