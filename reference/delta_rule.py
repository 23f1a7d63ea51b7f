"""The delta rule four independent ways.

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,    o_t = scale * S_t^T q_t      (S_t: [K, V])

All return ``(o [B, T, H, V], final_state [N, H, K, V] or None)`` in float64; ``delta_rule_parallel`` also
returns the T x T matrix ``A`` (per sequence, per head) with ``o = scale * Q S0 + A (V - K S0)``.
"""
import torch

from reference.segments import default_scale, initial, num_sequences, segments


def _prepare(q, k, v, beta, scale, initial_state, cu_seqlens):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_sequences(B, cu_seqlens)
    S0 = initial(initial_state, N, H, K, V, q)
    return (q.double(), k.double(), v.double(), beta.double(), default_scale(scale, K), S0,
            list(segments(B, T, cu_seqlens)))


def delta_rule_recurrent(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
    """Token by token: S <- S - beta k (k^T S) + beta k v^T, o = scale S^T q."""
    q, k, v, beta, scale, S0, segs = _prepare(q, k, v, beta, scale, initial_state, cu_seqlens)
    o, finals = [], []
    for n, b, s, e in segs:
        S = S0[n]
        for t in range(s, e):
            kt, vt, bt = k[b, t], v[b, t], beta[b, t, :, None, None]
            S = S - bt * kt[:, :, None] * torch.einsum("hk,hkv->hv", kt, S)[:, None, :] \
                + bt * kt[:, :, None] * vt[:, None, :]
            o.append(((b, t), scale * torch.einsum("hkv,hk->hv", S, q[b, t])))
        finals.append(S)
    return _assemble(o, v), (torch.stack(finals) if output_final_state else None)


def delta_rule_householder(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                           cu_seqlens=None):
    """Explicit products: P_r = prod_{i<=r} (I - beta_i k_i k_i^T) (newest on the left) and
    H_r = sum_{i<=r} (prod_{i<j<=r} (I - beta_j k_j k_j^T)) beta_i k_i v_i^T, as dense matrices;
    S_r = P_r S_0 + H_r."""
    q, k, v, beta, scale, S0, segs = _prepare(q, k, v, beta, scale, initial_state, cu_seqlens)
    H, K, V = S0.shape[1:]
    eye = torch.eye(K, dtype=torch.float64, device=q.device).expand(H, K, K)
    o, finals = [], []
    for n, b, s, e in segs:
        P, Hr = eye, q.new_zeros(H, K, V)
        for t in range(s, e):
            G = eye - beta[b, t, :, None, None] * k[b, t, :, :, None] * k[b, t, :, None, :]
            P = G @ P
            Hr = G @ Hr + beta[b, t, :, None, None] * k[b, t, :, :, None] * v[b, t, :, None, :]
            S = P @ S0[n] + Hr
            o.append(((b, t), scale * torch.einsum("hkv,hk->hv", S, q[b, t])))
        finals.append(P @ S0[n] + Hr)
    return _assemble(o, v), (torch.stack(finals) if output_final_state else None)


def wy_representation(k, v, beta):
    """UT transform of one chunk (per head; k [H, C, K], v [H, C, V], beta [H, C]):
    T = (I + tril(diag(beta) K K^T, -1))^-1 diag(beta), W = T K, U = T V; then
    prod_i (I - beta_i k_i k_i^T) = I - K^T W and the chunk's write H = K^T U."""
    C = k.shape[-2]
    A = torch.tril(beta[..., :, None] * (k @ k.transpose(-1, -2)), -1)
    L = torch.eye(C, dtype=torch.float64, device=k.device) + A
    T = torch.linalg.solve_triangular(L, torch.diag_embed(beta), upper=False, unitriangular=True)
    return T @ k, T @ v, T


def delta_rule_chunkwise(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, chunk_size=64):
    """Chunkwise WY/UT form: per chunk, with S the state entering it and M the inclusive causal mask,
    O = scale (Q S + (Q K^T * M)(U - W S)),  S <- S + K^T (U - W S)."""
    q, k, v, beta, scale, S0, segs = _prepare(q, k, v, beta, scale, initial_state, cu_seqlens)
    o, finals = [], []
    for n, b, s, e in segs:
        S = S0[n]
        for cs in range(s, e, chunk_size):
            ce = min(cs + chunk_size, e)
            Qc, Kc, Vc = (x[b, cs:ce].transpose(0, 1) for x in (q, k, v))  # [H, C, *]
            W, U, _ = wy_representation(Kc, Vc, beta[b, cs:ce].T)
            M = torch.ones(ce - cs, ce - cs, dtype=torch.bool, device=q.device).tril()
            new = U - W @ S
            Oc = scale * (Qc @ S + (Qc @ Kc.transpose(-1, -2)).masked_fill(~M, 0) @ new)
            S = S + Kc.transpose(-1, -2) @ new
            o.extend(((b, t), Oc[:, t - cs]) for t in range(cs, ce))
        finals.append(S)
    return _assemble(o, v), (torch.stack(finals) if output_final_state else None)


def delta_rule_parallel(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None):
    """The quadratic form: the whole sequence as one chunk. A = scale (Q K^T * M) T (T x T per head),
    o = scale Q S0 + A (V - K S0). Returns (o, final_state, [A per sequence, each [H, T_n, T_n]])."""
    q, k, v, beta, scale, S0, segs = _prepare(q, k, v, beta, scale, initial_state, cu_seqlens)
    o, finals, attn = [], [], []
    for n, b, s, e in segs:
        Qc, Kc, Vc = (x[b, s:e].transpose(0, 1) for x in (q, k, v))
        W, U, T = wy_representation(Kc, Vc, beta[b, s:e].T)
        M = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
        A = scale * (Qc @ Kc.transpose(-1, -2)).masked_fill(~M, 0) @ T
        Oc = scale * Qc @ S0[n] + A @ (Vc - Kc @ S0[n])
        finals.append(S0[n] + Kc.transpose(-1, -2) @ (U - W @ S0[n]))
        attn.append(A)
        o.extend(((b, t), Oc[:, t - s]) for t in range(s, e))
    return _assemble(o, v), (torch.stack(finals) if output_final_state else None), attn


def _assemble(pieces, v):
    """Stack per-token outputs [H, V] back into [B, T, H, V] (differentiably)."""
    B, T, H, V = v.shape
    if not pieces:
        return v.new_zeros(B, T, H, V, dtype=torch.float64)
    order = {bt: x for bt, x in pieces}
    return torch.stack([torch.stack([order[(b, t)] for t in range(T)]) for b in range(B)]) if T else \
        v.new_zeros(B, T, H, V, dtype=torch.float64)
