"""Iterate over the independent sequences of a batch or of a packed (``cu_seqlens``) batch."""
import torch


def segments(B: int, T: int, cu_seqlens: torch.Tensor | None):
    """Yield ``(n, b, start, end)``: sequence n lives in batch row b at time steps [start, end)."""
    if cu_seqlens is None:
        for b in range(B):
            yield b, b, 0, T
        return
    if B != 1:
        raise ValueError(f"cu_seqlens needs batch size 1, got B={B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != T or any(e < s for s, e in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={T}, got {cu}")
    for n, (s, e) in enumerate(zip(cu[:-1], cu[1:])):
        yield n, 0, s, e


def num_sequences(B: int, cu_seqlens: torch.Tensor | None) -> int:
    return B if cu_seqlens is None else len(cu_seqlens) - 1


def initial(initial_state, N, H, K, V, like):
    """The float64 initial state ``[N, H, K, V]`` (zeros when None)."""
    if initial_state is None:
        return like.new_zeros(N, H, K, V, dtype=torch.float64)
    return initial_state.double()


def default_scale(scale, K):
    return K ** -0.5 if scale is None else scale
