"""What the harness and the accuracy sweep run: a small registry of op families and their forms.

A *family* says how to make inputs for an op, how to call one of its forms, which inputs get gradients, and
which float64 reference (memory-safe at large T) its results are held to. A *form* is one implementation of a
family: ours (ops/), a peer (fla), or a baseline (torch's SDPA). To add an op (IPLR, DPLR, DeltaFormer, ...):
write its input maker and call adapter, add a Family, then append Forms; harness, accuracy, plots and report
pick them up by name.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64",
          "float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def torch_dtype(name: str):
    import torch
    return getattr(torch, DTYPES[name])


def load(target: str) -> Callable:
    """'package.module:function' -> the function (ImportError/AttributeError propagate)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------------------------
# Input makers: fresh random data (never zeros), unit-norm keys, beta in (0, 1)
# --------------------------------------------------------------------------------------------------------------

def make_delta_rule_inputs(B, T, H, K, V, dtype, device, seed=0, initial_state=False):
    """q, v ~ N(0, 1); k = unit-norm rows of N(0, 1); beta = sigmoid(N(0, 1)) in (0, 1); S0 ~ N(0, 1) / 4 in the
    accumulation dtype. Drawn in float32 (float64 for float64) on the device, then rounded to `dtype`."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    q = torch.randn(B, T, H, K, generator=g, device=device, dtype=acc)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, device=device, dtype=acc), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, device=device, dtype=acc)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g, device=device, dtype=acc))
    out = dict(q=q.to(dt), k=k.to(dt), v=v.to(dt), beta=beta.to(dt))
    if initial_state:
        out["initial_state"] = torch.randn(B, H, K, V, generator=g, device=device, dtype=acc) / 4
    return out


def call_delta_rule(fn, x, output_final_state=False, **kwargs):
    """fla-style call: fn(q, k, v, beta, initial_state=, output_final_state=) -> (o, final state or None)."""
    o, ht = fn(x["q"], x["k"], x["v"], x["beta"], initial_state=x.get("initial_state"),
               output_final_state=output_final_state, **kwargs)
    return o, (ht if output_final_state else None)


def call_delta_rule_parallel(fn, x, output_final_state=False, **kwargs):
    """parallel_delta_rule(q, k, v, beta, initial_state=) -> (o, A): no final state."""
    o, _ = fn(x["q"], x["k"], x["v"], x["beta"], initial_state=x.get("initial_state"), **kwargs)
    return o, None


def to_attention_inputs(x):
    """Softmax attention's [B, H, T, D] layout from the same q, k, v values (contiguous copies)."""
    return {n: x[n].transpose(1, 2).contiguous() for n in ("q", "k", "v")}


_SDPA_FALLBACK = set()  # (dtype, K, V) where the flash backend refused the inputs


def call_sdpa(fn, x, output_final_state=False, **kwargs):
    """Causal SDPA on [B, H, T, D] inputs, pinned to the flash backend where it takes them (CUDA, half
    precision), else torch's default choice. Returns (o, None)."""
    import torch
    import torch.nn.functional as F
    q, k, v = x["q"], x["k"], x["v"]
    key = (q.dtype, q.shape[-1], v.shape[-1])
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key not in _SDPA_FALLBACK:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True), None
        except (ImportError, RuntimeError):
            _SDPA_FALLBACK.add(key)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True), None


def sdpa_backend(q, v) -> str:
    """Which backend call_sdpa used for inputs like q, v."""
    import torch
    key = (q.dtype, q.shape[-1], v.shape[-1])
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and key not in _SDPA_FALLBACK:
        return "flash"
    return "default"


def sdpa(q, k, v):
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# --------------------------------------------------------------------------------------------------------------
# Families and forms
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    name: str
    make_inputs: Callable          # (B, T, H, K, V, dtype, device, seed, initial_state) -> dict of tensors
    grad_names: tuple              # inputs that get gradients in fwd+bwd timing and in the accuracy sweep
    reference: str | None = None   # 'module:function', float64 and memory-safe on the GPU at large T
    reference_kwargs: dict = field(default_factory=dict)
    bytes_model: str = "delta_rule"


@dataclass(frozen=True)
class Form:
    name: str                      # unique id used in data files: "chunk", "fla.chunk", "sdpa"
    label: str                     # legend label
    family: str                    # key of FAMILIES
    form: str                      # form within the op: chunk | fused_recurrent | parallel | sdpa
    provider: str                  # ours | fla | torch
    target: str                    # 'module:function'
    call: Callable                 # (fn, inputs, output_final_state, **kwargs) -> (o, final or None)
    flops_model: str               # key of benchmarks.flops.FWD_FLOPS
    final_state: bool = True       # returns the final state
    max_T: int | None = None       # default cap on T in the speed sweep (per point budget still applies)
    decode: bool = False           # runs the decode benchmark (T = 1, carried state)
    accuracy: bool = True          # in the accuracy sweep
    max_T_accuracy: int | None = None
    adapt_inputs: Callable | None = None  # delta-rule inputs -> this form's inputs (same values)
    kwargs: dict = field(default_factory=dict)
    dtypes: tuple | None = None    # dtypes it supports (None: all four)

    @property
    def op(self) -> str:
        return self.family

    def load(self) -> Callable:
        return load(self.target)


FAMILIES = {
    "delta_rule": Family("delta_rule", make_delta_rule_inputs, ("q", "k", "v", "beta", "initial_state"),
                         reference="reference:delta_rule_chunkwise"),
    # softmax attention shares the delta rule's q, k, v (a baseline, not held to a reference here)
    "softmax_attention": Family("softmax_attention", make_delta_rule_inputs, ("q", "k", "v"),
                                bytes_model="attention"),
}

FORMS = [
    Form("chunk", "chunk (ours)", "delta_rule", "chunk", "ours",
         "ops.delta_rule.chunk:chunk_delta_rule", call_delta_rule, "chunk"),
    Form("fused_recurrent", "fused recurrent (ours)", "delta_rule", "fused_recurrent", "ours",
         "ops.delta_rule.fused_recurrent:fused_recurrent_delta_rule", call_delta_rule, "fused_recurrent",
         decode=True),
    Form("parallel", "parallel (ours)", "delta_rule", "parallel", "ours",
         "ops.delta_rule.parallel:parallel_delta_rule", call_delta_rule_parallel, "parallel",
         final_state=False, max_T=16384, max_T_accuracy=16384),
    # fla 0.6.0's chunk form asserts "does not support float32. Please use bfloat16."
    Form("fla.chunk", "chunk (fla)", "delta_rule", "chunk", "fla",
         "fla.ops.delta_rule:chunk_delta_rule", call_delta_rule, "chunk",
         dtypes=("float16", "bfloat16")),
    Form("fla.fused_recurrent", "fused recurrent (fla)", "delta_rule", "fused_recurrent", "fla",
         "fla.ops.delta_rule:fused_recurrent_delta_rule", call_delta_rule, "fused_recurrent", decode=True,
         dtypes=("float16", "bfloat16", "float32")),
    Form("sdpa", "causal SDPA (torch)", "softmax_attention", "sdpa", "torch",
         "benchmarks.registry:sdpa", call_sdpa, "softmax_attention", final_state=False, accuracy=False,
         adapt_inputs=to_attention_inputs),
]

BY_NAME = {f.name: f for f in FORMS}


def get(name: str) -> Form:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown form {name!r}; known: {', '.join(BY_NAME)}") from None


def availability(form: Form):
    """(True, version-or-'') if the form's callable imports, else (False, reason)."""
    try:
        form.load()
    except Exception as e:  # ImportError, AttributeError, a peer's own init errors
        return False, f"unavailable: {type(e).__name__}: {e}"
    return True, ""
