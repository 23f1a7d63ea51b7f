"""Chunkwise (training) form of the DPLR delta rule: a thin autograd Function over the Triton kernels.

    S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,    o_t = scale * S_t^T q_t     (state [K, V])

IPLR (gk = None) runs the same kernels with USE_GK=False. Derivation, per chunk with entering state h, G the
chunk-local cumsum of gk and w_i = a_i^T S_{i-1}:
    S_i = exp(G_i) h + sum_{j <= i} exp(G_i - G_j) (b_j w_j^T + k_j v_j^T)      (exp acting per key channel)
so W = A_ab W + A_ak V + (a exp(G^-)) h and O = scale (q exp(G) h + A_qb W + A_qk V), with the intra-chunk
matrices of chunk_A.py; W = U + Wm h by the WY stage; the state leaving the chunk is
exp(gamma) h + (b exp(gamma - G))^T W + (k exp(gamma - G))^T V.

Forward:  cumsum (G) -> chunk_A (A_qk, A_qb, A_ak, A_ab, q exp(G), a exp(G^-), k and b exp(gamma - G))
          -> wy_fwd (X, Wm, U) -> chunk_h_fwd (h, W, final) -> chunk_o_fwd (o).
Backward: chunk_o_bwd_local (dA_qk, dA_qb, dW, dV local) -> chunk_h_bwd (dh, dW, dV, dS0)
          -> chunk_o_bwd_state (dq, dk, db, dWm, dgamma through the states) -> wy_bwd (dv, dA_ak, dA_ab, da)
          -> chunk_A_bwd (dq, dk, da, db, dgk).
Supported decays: any gk <= 0 (see chunk_A.py; the tests go down to gk = -20 per step), no exp(+big) is formed.
"""
from typing import NamedTuple

import torch

import ops.common.utils as U
from ops.common.compile_ahead import first_call
from ops.generalized_delta_rule.dplr import chunk_h, chunk_o, wy_fast
from ops.generalized_delta_rule.dplr.chunk_A import chunk_A_bwd, chunk_A_fwd
from ops.generalized_delta_rule.dplr.chunk_h import chunk_h_bwd, chunk_h_fwd
from ops.generalized_delta_rule.dplr.chunk_o import chunk_o_bwd_local, chunk_o_bwd_state, chunk_o_fwd
from ops.generalized_delta_rule.dplr.cumsum import chunk_cumsum
from ops.generalized_delta_rule.dplr.wy_fast import wy_bwd, wy_fwd
from ops.generalized_delta_rule.utils import check_inputs

CHUNK_SIZES = (16, 32, 64)


class Storage(NamedTuple):
    """Storage dtypes of the intermediates that go to memory between the kernels."""
    qh: torch.dtype      # q exp(G): operand of chunk_o_fwd and chunk_h_bwd
    ah: torch.dtype      # a exp(G^-): operand of wy_fwd
    kbt: torch.dtype     # k exp(gamma - G), b exp(gamma - G): operands of chunk_h_fwd and chunk_h_bwd
    aq: torch.dtype      # A_qk, A_qb: operands of chunk_o_fwd and chunk_o_bwd_local
    aak: torch.dtype     # A_ak: operand of wy_fwd and wy_bwd
    x: torch.dtype       # X = (I - A_ab)^-1: operand of wy_bwd
    wm: torch.dtype      # Wm: operand of chunk_h_fwd, chunk_h_bwd and wy_bwd
    u: torch.dtype       # U: added to Wm h by chunk_h_fwd, operand of wy_bwd
    h: torch.dtype       # states: operands of chunk_o_fwd, chunk_o_bwd_state, which also forms rowsum(dh * h)
    w: torch.dtype       # W: operand of chunk_o_fwd, chunk_o_bwd_local and chunk_o_bwd_state
    dw_loc: torch.dtype  # dW_loc, dV_loc: written by chunk_o_bwd_local, added to by chunk_h_bwd
    dh: torch.dtype      # dh: operand of chunk_o_bwd_state and in its rowsum(dh * h)
    dw: torch.dtype      # dW: operand of chunk_o_bwd_state and wy_bwd
    dv: torch.dtype      # dV through the states: added to by wy_bwd
    dwm: torch.dtype     # dWm: operand of wy_bwd


def storage(dtype, C, K, V):
    """Each intermediate in its readers' one operand type where they only multiply it in tl.dot (utils.read_storage:
    the rounding they apply anyway, so nothing they compute changes), in the half operand type under
    utils.HALF_STORAGE where a reader also adds it (utils.sum_storage: one more rounding), else the accumulation
    dtype; all in the accumulation dtype with DELTACHECK_DPLR_HALF_STORAGE=0. Half storage halves their bytes: at
    B=8, T=4096, H=16, K=V=128 the states alone are 537 MB in float32, written once and read twice."""
    acc = U.acc_dtype(dtype)
    if not U.DPLR_HALF_STORAGE:
        return Storage(*([acc] * len(Storage._fields)))
    o_fwd, o_loc, o_st = chunk_o.operands(dtype, C, K, V)
    wy_f, wy_b = wy_fast.operands(dtype, C, K, V)
    h_f, h_b = chunk_h.operands(dtype, C, K, V)

    def read(*readers):
        return U.read_storage(dtype, *readers)

    def summed(*kernels):  # (the writer's and readers' operand types)
        return U.sum_storage(kernels[0]) if len(set(kernels)) == 1 else acc
    return Storage(qh=read(o_fwd, h_b), ah=read(wy_f), kbt=read(h_f, h_b), aq=read(o_fwd, o_loc),
                   aak=read(wy_f, wy_b), x=read(wy_b), wm=read(h_f, h_b, wy_b), u=summed(wy_f, h_f, wy_b),
                   h=summed(h_f, o_fwd, o_st), w=read(o_fwd, o_loc, o_st), dw_loc=summed(o_loc, h_b),
                   dh=summed(h_b, o_st), dw=read(o_st, wy_b), dv=summed(h_b, wy_b), dwm=read(wy_b))


def chunk_dplr_fwd(q, k, v, a, b, gk, scale_t, initial_state, output_final_state, idx, chunk_size):
    offsets, cmap, chunk_offsets, NC = idx
    st = storage(q.dtype, chunk_size, k.shape[-1], v.shape[-1])
    g = None if gk is None else chunk_cumsum(gk, offsets, cmap, chunk_size, q.dtype)
    Aqk, Aqb, Aak, Aab, qh, ah, kt, bt = chunk_A_fwd(q, k, a, b, g, gk, offsets, cmap, chunk_size, aq_dtype=st.aq,
                                                     aak_dtype=st.aak, qh_dtype=st.qh, ah_dtype=st.ah,
                                                     kbt_dtype=st.kbt)
    x, wm, u = wy_fwd(ah, v, Aak, Aab, offsets, cmap, chunk_size, x_dtype=st.x, wm_dtype=st.wm, u_dtype=st.u)
    h, w, ht = chunk_h_fwd(kt, bt, v, g, wm, u, initial_state, output_final_state, offsets, chunk_offsets, NC,
                           chunk_size, h_dtype=st.h, w_dtype=st.w)
    o = chunk_o_fwd(qh, v, h, w, Aqk, Aqb, scale_t, offsets, cmap, chunk_size)
    return o, ht, (g, Aqk, Aqb, Aak, x, wm, u, h, w, qh, kt, bt)


def chunk_dplr_bwd(q, k, v, a, b, gk, scale_t, initial_state, do, dht, saved, idx, chunk_size):
    offsets, cmap, chunk_offsets, NC = idx
    g, Aqk, Aqb, Aak, x, wm, u, h, w, qh, kt, bt = saved
    st = storage(q.dtype, chunk_size, k.shape[-1], v.shape[-1])
    dAqk, dAqb, dw_loc, dv_loc = chunk_o_bwd_local(v, w, do, Aqk, Aqb, scale_t, offsets, cmap, chunk_size,
                                                   dw_dtype=st.dw_loc, dv_dtype=st.dw_loc)
    dh, dw, dv_h, ds0 = chunk_h_bwd(qh, kt, bt, g, wm, do, dw_loc, dv_loc, dht, initial_state, scale_t, offsets,
                                    chunk_offsets, NC, chunk_size, dh_dtype=st.dh, dw_dtype=st.dw, dv_dtype=st.dv)
    dq_h, dk_h, db_h, dwm, dgam = chunk_o_bwd_state(k, b, v, g, h, w, do, dh, dw, scale_t, offsets, cmap,
                                                    chunk_size, dwm_dtype=st.dwm)
    dv, dAak, dAab, da_w = wy_bwd(g, gk, v, Aak, x, wm, u, dwm, dw, dv_h, offsets, cmap, chunk_size)
    dq, dk, da, db, dgk = chunk_A_bwd(q, k, a, b, g, gk, (dAqk, dAqb, dAak, dAab), (dq_h, dk_h, da_w, db_h), dgam,
                                      offsets, cmap, chunk_size)
    return dq, dk, dv, da, db, dgk, ds0


class ChunkDPLRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens, chunk_size):
        B, T = q.shape[:2]
        q, k, v, a, b = (x.contiguous() for x in (q, k, v, a, b))
        gk = None if gk is None else gk.contiguous()
        initial_state = None if initial_state is None else initial_state.contiguous()
        with U.on_device(q.device):
            idx = U.chunk_index(cu_seqlens, B, T, chunk_size, q.device)
            scale_t = U.scale_arg(scale, q.dtype, q.device)
            o, ht, saved = chunk_dplr_fwd(q, k, v, a, b, gk, scale_t, initial_state, output_final_state, idx,
                                          chunk_size)
        ctx.save_for_backward(q, k, v, a, b, gk, initial_state, scale_t, *idx[:3], *saved)
        ctx.chunk_size, ctx.NC = chunk_size, idx.NC
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, a, b, gk, initial_state, scale_t, offsets, cmap, chunk_offsets, *saved = ctx.saved_tensors
        idx = U.ChunkIndex(offsets, cmap, chunk_offsets, ctx.NC)
        do = do.contiguous()
        dht = None if dht is None else dht.contiguous()
        with U.on_device(q.device):
            dq, dk, dv, da, db, dgk, ds0 = chunk_dplr_bwd(q, k, v, a, b, gk, scale_t, initial_state, do, dht, saved,
                                                          idx, ctx.chunk_size)
        return dq, dk, dv, da, db, dgk, None, ds0, None, None, None


def check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES}, got {chunk_size!r}")


def fitting_chunk_size(chunk_size, dtype, K):
    """The chunk size the kernels run with: the one asked for, except float64 with K > 128 runs in chunks of at
    most 32 (the state pass holds [C, K] tiles whole; at C = 64, K = 256 float64 they exceed an H100's shared
    memory). The result does not depend on the chunk size beyond rounding."""
    return min(chunk_size, 32) if dtype == torch.float64 and K > 128 else chunk_size


@first_call
def chunk_dplr_delta_rule(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None, chunk_size=64):
    """The DPLR delta rule in chunkwise form, fla layout (fla 0.6.0's chunk_dplr_delta_rule).

    S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,  o_t = scale S_t^T q_t.
    q, k, a, b, gk [B, T, H, K], v [B, T, H, V] (one dtype: float16, bfloat16, float32 or float64; gk may also
    be float32); gk is a log decay (<= 0); scale defaults to K^-0.5; initial_state [N, H, K, V]; cu_seqlens
    (int [N + 1], B == 1) packs N sequences; chunk_size in (16, 32, 64) (at most 32 for float64 with K > 128).
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] (float32; float64 for float64 inputs) when
    output_final_state else None). Differentiable in q, k, v, a, b, gk and initial_state."""
    if gk is None:
        raise TypeError("gk must be a torch.Tensor, got NoneType (use chunk_iplr_delta_rule for no decay)")
    *_, scale = check_inputs(q, k, v, a, b, gk, scale, initial_state, cu_seqlens)
    check_chunk_size(chunk_size)
    return ChunkDPLRFunction.apply(q, k, v, a, b, gk, scale, initial_state, bool(output_final_state), cu_seqlens,
                                   fitting_chunk_size(chunk_size, q.dtype, q.shape[-1]))
