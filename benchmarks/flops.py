"""FLOP and minimal-byte models for every benchmarked op, form and mode.

Conventions (one set for every form, so their TFLOP/s compare):

* A product of an [m, n] and an [n, p] matrix is 2 m n p FLOPs. A product whose result is masked to a causal
  (lower-triangular) half, or whose left factor is triangular, counts half of that: the useful work, as
  FlashAttention counts causal attention. Elementwise work (scaling by beta, masks, exp) is not counted.
* The inverse of a c x c unit lower-triangular matrix counts c^3 / 3 FLOPs (LAPACK's trtri count).
* Backward = 2 x forward: every product A B gets the two gradient products dA = dC B^T and dB = A^T dC of the
  same size. Recomputation inside backward kernels is not counted, so a fwd+bwd TFLOP/s is a lower bound of
  the executed rate (FlashAttention's own convention counts 2.5 x for its recomputed QK^T; we do not).
* Bytes are the minimal HBM traffic of one call: every input read once and every output written once, in the
  tensors' dtypes. No intermediate (chunk states, WY factors, attention probabilities) is counted, so a GB/s
  is what a kernel that touched each byte once would need; the fraction of the copy ceiling says how close a
  form is to being purely bandwidth-bound.

Shapes: B sequences of T tokens (or explicit `seqlens` for packed batches), H heads, key size K, value size V,
chunk size C. Modes: "fwd", "bwd", "fwd+bwd".
"""
from __future__ import annotations

import math

MODES = ("fwd", "bwd", "fwd+bwd")

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
               "fp16": 2, "bf16": 2, "fp32": 4, "fp64": 8}


def _mode_factor(mode: str) -> float:
    """fwd -> 1, bwd -> 2, fwd+bwd -> 3 times the forward FLOPs."""
    try:
        return {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}") from None


def _lengths(B: int, T: int, seqlens=None):
    return list(seqlens) if seqlens is not None else [T] * B


# --------------------------------------------------------------------------------------------------------------
# Forward FLOPs per head
# --------------------------------------------------------------------------------------------------------------

def chunk_fwd_flops_per_chunk(c: int, K: int, V: int) -> float:
    """One chunk of c tokens of the chunkwise (WY/UT) delta rule, per head. With h the [K, V] state entering the
    chunk and M the inclusive causal mask:

        A     = tril(diag(beta) K K^T, -1)          c^2 K        (strictly lower half of a c x c x K product)
        Tm    = (I + A)^-1 diag(beta)               c^3 / 3      (unit lower-triangular inverse)
        W     = Tm K,  U = Tm V                     c^2 K + c^2 V (triangular left factor)
        v_new = U - W h                             2 c K V
        h    <- h + K^T v_new                       2 c K V
        o     = Q h + (Q K^T * M) v_new             2 c K V + c^2 K + c^2 V

    Total: c^2 (3 K + 2 V) + c^3 / 3 + 6 c K V."""
    return c * c * (3 * K + 2 * V) + c ** 3 / 3 + 6 * c * K * V


def chunk_fwd_flops(B: int, T: int, H: int, K: int, V: int, chunk_size: int = 64, seqlens=None) -> float:
    """Chunkwise delta rule forward: chunk_fwd_flops_per_chunk summed over each sequence's chunks (the last one
    possibly shorter), times H."""
    total = 0.0
    for n in _lengths(B, T, seqlens):
        full, rest = divmod(n, chunk_size)
        total += full * chunk_fwd_flops_per_chunk(chunk_size, K, V)
        if rest:
            total += chunk_fwd_flops_per_chunk(rest, K, V)
    return H * total


def recurrent_fwd_flops(B: int, T: int, H: int, K: int, V: int, seqlens=None) -> float:
    """Token-by-token delta rule forward, per token and head with state S [K, V]:

        u = v - S^T k          2 K V
        S <- S + beta k u^T    2 K V
        o = S^T q              2 K V

    Total 6 K V per token and head."""
    return 6.0 * K * V * H * sum(_lengths(B, T, seqlens))


def parallel_fwd_flops(B: int, T: int, H: int, K: int, V: int, seqlens=None, initial_state: bool = False) -> float:
    """Quadratic (parallel) delta rule forward, per sequence of n tokens and head, with L = I + tril(diag(beta)
    K K^T, -1):

        tril(K K^T)                        n^2 K
        Ut = L^-1 diag(beta) (V - K S0)    n^2 V      (forward substitution with V right-hand sides)
        (Q K^T * M)                        n^2 K
        o = scale (Q S0 + (Q K^T * M) Ut)  n^2 V
        K S0 and Q S0 (with a state)       4 n K V

    Total 2 n^2 (K + V) (+ 4 n K V)."""
    total = 0.0
    for n in _lengths(B, T, seqlens):
        total += 2.0 * n * n * (K + V) + (4.0 * n * K * V if initial_state else 0.0)
    return H * total


def softmax_attention_fwd_flops(B: int, T: int, H: int, K: int, V: int, seqlens=None) -> float:
    """Causal softmax attention forward, per sequence of n tokens and head: S = Q K^T (causal half, n^2 K) and
    O = P V (causal half, n^2 V). Total n^2 (K + V); with K = V = D the usual causal 2 n^2 D."""
    return H * sum(n * n * (K + V) for n in _lengths(B, T, seqlens))


FWD_FLOPS = {
    "chunk": chunk_fwd_flops,
    "fused_recurrent": recurrent_fwd_flops,
    "recurrent": recurrent_fwd_flops,
    "parallel": parallel_fwd_flops,
    "softmax_attention": softmax_attention_fwd_flops,
}


def flops(model: str, mode: str, B: int, T: int, H: int, K: int, V: int, chunk_size: int = 64, seqlens=None,
          initial_state: bool = False) -> float:
    """FLOPs of one call of `model` (a key of FWD_FLOPS) in `mode`: the forward count times 1, 2 or 3."""
    if model not in FWD_FLOPS:
        raise ValueError(f"unknown FLOP model {model!r}; known: {sorted(FWD_FLOPS)}")
    if model == "chunk":
        fwd = chunk_fwd_flops(B, T, H, K, V, chunk_size=chunk_size, seqlens=seqlens)
    elif model == "parallel":
        fwd = parallel_fwd_flops(B, T, H, K, V, seqlens=seqlens, initial_state=initial_state)
    else:
        fwd = FWD_FLOPS[model](B, T, H, K, V, seqlens=seqlens)
    return fwd * _mode_factor(mode)


# --------------------------------------------------------------------------------------------------------------
# Minimal bytes
# --------------------------------------------------------------------------------------------------------------

def delta_rule_bytes(mode: str, B: int, T: int, H: int, K: int, V: int, dtype_bytes: int, N: int | None = None,
                     initial_state: bool = False, final_state: bool = False, state_bytes: int = 4) -> float:
    """Minimal HBM bytes of one delta-rule call (any form), tokens L = B T, N sequences:

        fwd: read q, k [L, H, K], v [L, H, V], beta [L, H]; write o [L, H, V]
             (+ read S0 [N, H, K, V] with an initial state, + write S_T with a final state, in state_bytes)
        bwd: read q, k, v, beta and do [L, H, V] (+ dS_T, + S0); write dq, dk, dv, dbeta (+ dS0)
        fwd+bwd: the sum."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    L = B * T
    N = B if N is None else N
    inputs = L * H * (2 * K + V + 1) * dtype_bytes
    state = N * H * K * V * state_bytes
    fwd = inputs + L * H * V * dtype_bytes + (state if initial_state else 0) + (state if final_state else 0)
    bwd = (inputs + L * H * V * dtype_bytes + inputs + (state if final_state else 0)
           + (2 * state if initial_state else 0))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def attention_bytes(mode: str, B: int, T: int, H: int, K: int, V: int, dtype_bytes: int) -> float:
    """Minimal bytes of softmax attention: fwd reads q, k [L, H, K], v [L, H, V] and writes o [L, H, V];
    bwd reads q, k, v, o and do, writes dq, dk, dv (the log-sum-exp rows are ignored); fwd+bwd the sum."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    L = B * T
    qkv = L * H * (2 * K + V) * dtype_bytes
    ov = L * H * V * dtype_bytes
    fwd = qkv + ov
    bwd = qkv + 2 * ov + qkv
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def decode_bytes(N: int, H: int, K: int, V: int, dtype_bytes: int, state_bytes: int = 4) -> float:
    """One decode step (T = 1 per sequence, state carried): read and write the state [N, H, K, V] (the dominant
    term) plus q, k, v, beta in and o out."""
    return 2.0 * N * H * K * V * state_bytes + N * H * (2 * K + 2 * V + 1) * dtype_bytes


def decode_state_bytes(N: int, H: int, K: int, V: int, state_bytes: int = 4) -> float:
    """The state's share of decode_bytes: one read and one write of [N, H, K, V]."""
    return 2.0 * N * H * K * V * state_bytes


def intensity(flop: float, byte: float) -> float:
    """Arithmetic intensity in FLOP per byte (inf when no bytes)."""
    return flop / byte if byte else math.inf


def roofline(intensity_: float, peak_flops: float, peak_bytes_per_s: float) -> float:
    """Attainable FLOP/s at an arithmetic intensity: min(peak, intensity x bandwidth)."""
    return min(peak_flops, intensity_ * peak_bytes_per_s)
