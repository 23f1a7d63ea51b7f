"""The generalized delta rule ("erase then write" with a general transition), state [K, V]:

    IPLR:  S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T
    DPLR:  S_t = (diag(exp(gk_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

(fla writes the transposed [V, K] form.) Each is given token by token and as explicit transition products
P_r = G_r ... G_1, H_r = sum_i G_r ... G_{i+1} k_i v_i^T, S_r = P_r S_0 + H_r. Returns (o, final_state or None).
"""
import torch

from reference.delta_rule import _assemble
from reference.segments import default_scale, initial, num_sequences, segments


def _run(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens, explicit):
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = num_sequences(B, cu_seqlens)
    S0 = initial(initial_state, N, H, K, V, q)
    scale = default_scale(scale, K)
    q, k, v, a, b = (x.double() for x in (q, k, v, a, b))
    decay = None if gk is None else torch.exp(gk.double())
    eye = torch.eye(K, dtype=torch.float64, device=q.device).expand(H, K, K)
    o, finals = [], []
    for n, bb, s, e in segments(B, T, cu_seqlens):
        S = S0[n]
        P, Hr = eye, q.new_zeros(H, K, V)
        for t in range(s, e):
            write = k[bb, t, :, :, None] * v[bb, t, :, None, :]
            if explicit:
                D = eye if decay is None else torch.diag_embed(decay[bb, t])
                G = D + b[bb, t, :, :, None] * a[bb, t, :, None, :]
                P, Hr = G @ P, G @ Hr + write
                S = P @ S0[n] + Hr
            else:
                low_rank = b[bb, t, :, :, None] * torch.einsum("hk,hkv->hv", a[bb, t], S)[:, None, :]
                S = (S if decay is None else decay[bb, t, :, :, None] * S) + low_rank + write
            o.append(((bb, t), scale * torch.einsum("hkv,hk->hv", S, q[bb, t])))
        finals.append(S)
    return _assemble(o, v), (torch.stack(finals) if output_final_state else None)


def iplr_recurrent(q, k, v, a, b, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """S <- S + b (a^T S) + k v^T, token by token."""
    return _run(q, k, v, a, b, None, scale, initial_state, output_final_state, cu_seqlens, explicit=False)


def iplr_transition_product(q, k, v, a, b, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """S_r = P_r S_0 + H_r with G_t = I + b_t a_t^T as dense K x K matrices."""
    return _run(q, k, v, a, b, None, scale, initial_state, output_final_state, cu_seqlens, explicit=True)


def dplr_recurrent(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None):
    """S <- exp(gk) * S + b (a^T S) + k v^T, token by token (gk: log-decay per key channel)."""
    return _run(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens, explicit=False)


def dplr_transition_product(q, k, v, a, b, gk, scale=None, initial_state=None, output_final_state=False,
                            cu_seqlens=None):
    """S_r = P_r S_0 + H_r with G_t = diag(exp(gk_t)) + b_t a_t^T as dense K x K matrices."""
    return _run(q, k, v, a, b, gk, scale, initial_state, output_final_state, cu_seqlens, explicit=True)
