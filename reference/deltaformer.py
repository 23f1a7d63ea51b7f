"""DeltaFormer: erase-then-write on top of softmax attention.

    u_i = v_i - beta_i * sum_{j<i} softmax_j(scale q_i . k_j over j < i) u_j,    o = causal softmax attention(q, k, u)

Equivalently (I + diag(beta) P) u = v with P the strictly causal softmax weights (row 0 of P is empty: u_0 = v_0).
q, k [B, T, H, D], v [B, T, H, V], beta [B, T, H] (None: ones). Returns o in float64.
"""
import torch

from reference.delta_rule import _assemble
from reference.segments import default_scale, segments


def _prep(q, k, v, beta, scale):
    B, T, H, D = q.shape
    beta = q.new_ones(B, T, H, dtype=torch.float64) if beta is None else beta.double()
    return q.double(), k.double(), v.double(), beta, default_scale(scale, D)


def causal_softmax_attention(q, k, v, scale=None, cu_seqlens=None):
    """o_i = sum_{j<=i} softmax_j(scale q_i . k_j) v_j, per head and per sequence."""
    q, k, v, _, scale = _prep(q, k, v, None, scale)
    B, T = q.shape[:2]
    o = []
    for _, b, s, e in segments(B, T, cu_seqlens):
        Qs, Ks, Vs = (x[b, s:e].transpose(0, 1) for x in (q, k, v))
        M = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
        P = torch.softmax((scale * Qs @ Ks.transpose(-1, -2)).masked_fill(~M, float("-inf")), -1)
        Os = P @ Vs
        o.extend(((b, t), Os[:, t - s]) for t in range(s, e))
    return _assemble(o, v)


def strict_causal_softmax(q, k, scale):
    """P_ij = softmax_j(scale q_i . k_j over j < i), zero on and above the diagonal (q, k: [H, T, D])."""
    T = q.shape[-2]
    M = torch.ones(T, T, dtype=torch.bool, device=q.device).tril(-1)
    logits = (scale * q @ k.transpose(-1, -2)).masked_fill(~M, float("-inf"))
    # row 0 is all -inf: its weights are defined as zero (an empty sum)
    P = torch.softmax(logits.masked_fill(~M.any(-1, keepdim=True), 0.0), -1)
    return P.masked_fill(~M, 0.0)


def deltaformer_recurrent(q, k, v, beta=None, scale=None, cu_seqlens=None):
    """u token by token from the definition, then causal softmax attention over u."""
    q, k, v, beta, scale = _prep(q, k, v, beta, scale)
    B, T = q.shape[:2]
    u = []
    for _, b, s, e in segments(B, T, cu_seqlens):
        us = []
        for i in range(s, e):
            if i == s:
                us.append(v[b, i])
                continue
            w = torch.softmax(scale * torch.einsum("hd,jhd->hj", q[b, i], k[b, s:i]), -1)  # [H, i-s]
            us.append(v[b, i] - beta[b, i, :, None] * torch.einsum("hj,jhv->hv", w, torch.stack(us)))
        u.extend(((b, t), us[t - s]) for t in range(s, e))
    return causal_softmax_attention(q, k, _assemble(u, v), scale, cu_seqlens)


def deltaformer_solve(q, k, v, beta=None, scale=None, cu_seqlens=None, return_u=False):
    """u from the unit lower-triangular solve (I + diag(beta) P) u = v, then causal softmax attention."""
    q, k, v, beta, scale = _prep(q, k, v, beta, scale)
    B, T = q.shape[:2]
    u = []
    for _, b, s, e in segments(B, T, cu_seqlens):
        Qs, Ks, Vs = (x[b, s:e].transpose(0, 1) for x in (q, k, v))
        P = strict_causal_softmax(Qs, Ks, scale)
        L = torch.eye(e - s, dtype=torch.float64, device=q.device) + beta[b, s:e].T[:, :, None] * P
        us = torch.linalg.solve_triangular(L, Vs, upper=False, unitriangular=True)
        u.extend(((b, t), us[:, t - s]) for t in range(s, e))
    u = _assemble(u, v)
    o = causal_softmax_attention(q, k, u, scale, cu_seqlens)
    return (o, u) if return_u else o
