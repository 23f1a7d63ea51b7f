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

* Every chunk form of an op is counted at the same chunk size C = 64, whatever chunk size it runs (fla's DPLR
  chunk form runs C = 16 by default): forms of one op then have equal counts, and their TFLOP/s compare like
  their times.

Shapes: B sequences of T tokens (or explicit `seqlens` for packed batches), H heads, key size K, value size V,
chunk size C. Modes: "fwd", "bwd", "fwd+bwd".

Models (FWD_FLOPS keys): chunk, fused_recurrent / recurrent, parallel (the delta rule); deltaformer;
generalized_chunk, generalized_recurrent (IPLR and DPLR: the decay is elementwise and not counted, so both
share a count); softmax_attention. Byte models (BYTES keys): delta_rule, attention, deltaformer, iplr, dplr.
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


def deltaformer_fwd_flops(B: int, T: int, H: int, K: int, V: int, seqlens=None) -> float:
    """DeltaFormer forward, per sequence of n tokens and head, with S = scale Q K^T, P its strictly causal softmax,
    A its causal softmax:

        S = scale Q K^T                 n^2 K      (causal half; both softmaxes read the same logits)
        u = (I + diag(beta) P)^-1 v     n^2 V      (forward substitution with V right-hand sides)
        o = A u                         n^2 V      (causal half)

    Total n^2 (K + 2 V). The logits are counted once although the two softmaxes normalize them apart; a form
    that recomputes them per pass (ours computes them in three) executes more than it is credited."""
    return H * sum(n * n * (K + 2.0 * V) for n in _lengths(B, T, seqlens))


def generalized_chunk_fwd_flops_per_chunk(c: int, K: int, V: int) -> float:
    """One chunk of c tokens of the chunkwise IPLR / DPLR delta rule, per head, with h the [K, V] state entering the
    chunk (the decays exp(G) scale rows elementwise and are not counted):

        A_ab = tril(a b^T, -1), A_ak = tril(a k^T, -1)       2 c^2 K  (strictly lower halves)
        A_qk = tril(q k^T), A_qb = tril(q b^T)                2 c^2 K  (causal halves)
        Tm = (I - A_ab)^-1                                    c^3 / 3  (unit lower-triangular inverse)
        Wm = Tm a,  U = Tm (A_ak V)                           c^2 K + 2 c^2 V  (triangular factors)
        W = U + Wm h                                          2 c K V
        h <- exp(gamma) h + b^T W + k^T V                     4 c K V
        o = scale (q h + A_qb W + A_qk V)                     2 c K V + 2 c^2 V

    Total: c^2 (5 K + 4 V) + c^3 / 3 + 8 c K V."""
    return c * c * (5 * K + 4 * V) + c ** 3 / 3 + 8 * c * K * V


def generalized_chunk_fwd_flops(B: int, T: int, H: int, K: int, V: int, chunk_size: int = 64,
                                seqlens=None) -> float:
    """Chunkwise IPLR / DPLR forward: generalized_chunk_fwd_flops_per_chunk over each sequence's chunks (the last
    one possibly shorter), times H."""
    total = 0.0
    for n in _lengths(B, T, seqlens):
        full, rest = divmod(n, chunk_size)
        total += full * generalized_chunk_fwd_flops_per_chunk(chunk_size, K, V)
        if rest:
            total += generalized_chunk_fwd_flops_per_chunk(rest, K, V)
    return H * total


def generalized_recurrent_fwd_flops(B: int, T: int, H: int, K: int, V: int, seqlens=None) -> float:
    """Token-by-token IPLR / DPLR forward, per token and head with state S [K, V] (the decay exp(gk) * S is
    elementwise, not counted):

        w = S^T a              2 K V
        S <- S + b w^T         2 K V
        S <- S + k v^T         2 K V
        o = scale S^T q        2 K V

    Total 8 K V per token and head."""
    return 8.0 * K * V * H * sum(_lengths(B, T, seqlens))


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
    "deltaformer": deltaformer_fwd_flops,
    "generalized_chunk": generalized_chunk_fwd_flops,
    "generalized_recurrent": generalized_recurrent_fwd_flops,
}
CHUNKED = ("chunk", "generalized_chunk")  # models that take chunk_size


def flops(model: str, mode: str, B: int, T: int, H: int, K: int, V: int, chunk_size: int = 64, seqlens=None,
          initial_state: bool = False) -> float:
    """FLOPs of one call of `model` (a key of FWD_FLOPS) in `mode`: the forward count times 1, 2 or 3."""
    if model not in FWD_FLOPS:
        raise ValueError(f"unknown FLOP model {model!r}; known: {sorted(FWD_FLOPS)}")
    if model in CHUNKED:
        fwd = FWD_FLOPS[model](B, T, H, K, V, chunk_size=chunk_size, seqlens=seqlens)
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


def _gk_bytes(dtype_bytes: int) -> int:
    """gk travels in float32 (float64 for float64 inputs): benchmarks.registry.make_dplr_inputs."""
    return max(4, dtype_bytes)


def generalized_delta_rule_bytes(mode: str, B: int, T: int, H: int, K: int, V: int, dtype_bytes: int,
                                 decay: bool = False, N: int | None = None, initial_state: bool = False,
                                 final_state: bool = False, state_bytes: int = 4) -> float:
    """Minimal HBM bytes of one IPLR (decay=False) or DPLR (decay=True) call, tokens L = B T, N sequences:

        fwd: read q, k, a, b [L, H, K], v [L, H, V] (+ gk [L, H, K] in float32 for DPLR); write o [L, H, V]
             (+ read S0, + write S_T, [N, H, K, V] in state_bytes)
        bwd: read the same inputs and do [L, H, V] (+ dS_T, + S0); write dq, dk, da, db, dv (+ dgk) (+ dS0)
        fwd+bwd: the sum."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    L = B * T
    N = B if N is None else N
    inputs = L * H * ((4 * K + V) * dtype_bytes + (K * _gk_bytes(dtype_bytes) if decay else 0))
    ov = L * H * V * dtype_bytes
    state = N * H * K * V * state_bytes
    fwd = inputs + ov + (state if initial_state else 0) + (state if final_state else 0)
    bwd = inputs + ov + inputs + (state if final_state else 0) + (2 * state if initial_state else 0)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def deltaformer_bytes(mode: str, B: int, T: int, H: int, K: int, V: int, dtype_bytes: int) -> float:
    """Minimal bytes of DeltaFormer: the delta rule's tensors (q, k, v, beta in, o out; bwd: those and do in,
    dq, dk, dv, dbeta out) without a state. The solve's u and the row statistics are intermediates, not counted."""
    return delta_rule_bytes(mode, B, T, H, K, V, dtype_bytes)


BYTES = {
    "delta_rule": lambda mode, B, T, H, K, V, eb: delta_rule_bytes(mode, B, T, H, K, V, eb),
    "attention": attention_bytes,
    "deltaformer": deltaformer_bytes,
    "iplr": lambda mode, B, T, H, K, V, eb: generalized_delta_rule_bytes(mode, B, T, H, K, V, eb),
    "dplr": lambda mode, B, T, H, K, V, eb: generalized_delta_rule_bytes(mode, B, T, H, K, V, eb, decay=True),
}


def io_bytes(model: str, mode: str, B: int, T: int, H: int, K: int, V: int, dtype_bytes: int) -> float:
    """Minimal bytes of one call of a byte model (a key of BYTES; a family's bytes_model) without states."""
    if model not in BYTES:
        raise ValueError(f"unknown byte model {model!r}; known: {sorted(BYTES)}")
    return BYTES[model](mode, B, T, H, K, V, dtype_bytes)


def decode_bytes(N: int, H: int, K: int, V: int, dtype_bytes: int, state_bytes: int = 4,
                 model: str = "delta_rule") -> float:
    """One decode step (T = 1 per sequence, state carried): read and write the state [N, H, K, V] (the dominant
    term) plus the token's inputs and o: q, k, v, beta for the delta rule; q, k, a, b, v (+ gk in float32) for
    IPLR (model 'iplr') and DPLR ('dplr')."""
    if model in ("iplr", "dplr"):
        token = (4 * K + 2 * V) * dtype_bytes + (K * _gk_bytes(dtype_bytes) if model == "dplr" else 0)
    else:
        token = (2 * K + 2 * V + 1) * dtype_bytes
    return 2.0 * N * H * K * V * state_bytes + N * H * token


def decode_state_bytes(N: int, H: int, K: int, V: int, state_bytes: int = 4) -> float:
    """The state's share of decode_bytes: one read and one write of [N, H, K, V]."""
    return 2.0 * N * H * K * V * state_bytes


def intensity(flop: float, byte: float) -> float:
    """Arithmetic intensity in FLOP per byte (inf when no bytes)."""
    return flop / byte if byte else math.inf


def roofline(intensity_: float, peak_flops: float, peak_bytes_per_s: float) -> float:
    """Attainable FLOP/s at an arithmetic intensity: min(peak, intensity x bandwidth)."""
    return min(peak_flops, intensity_ * peak_bytes_per_s)
