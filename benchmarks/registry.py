"""What the harness and the accuracy sweep run: a small registry of op families and their forms.

A *family* says how to make inputs for an op, how to call one of its forms, which inputs get gradients, and
which float64 reference (memory-safe at large T) its results are held to. A *form* is one implementation of a
family: ours (ops/), a peer (fla), or a baseline (torch's SDPA). To add an op: write its input maker, its call
adapter and its reference adapter, add a Family (and its label to OPS), then append Forms; harness, accuracy,
plots and report pick them up by name.

Ops: the delta rule, DeltaFormer, the IPLR and the DPLR delta rule; causal SDPA is the baseline every op is
shown beside. Our forms and fla's import lazily (ops.generalized_delta_rule may be missing or broken while it is
written): a form that does not import is recorded as unavailable with the import error, never a crash.
"""
from __future__ import annotations

import importlib
import math
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


def _acc_dtype(dt):
    import torch
    return torch.float64 if dt == torch.float64 else torch.float32


def make_deltaformer_inputs(B, T, H, K, V, dtype, device, seed=0, initial_state=False):
    """q, k, v ~ N(0, 1) (keys not normalized: attention logits scale q.k of unit variance, as in softmax
    attention), beta = sigmoid(N(0, 1)) in (0, 1). DeltaFormer carries no state: `initial_state` is ignored.
    Drawn in float32 (float64 for float64), then rounded to `dtype`."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    acc = _acc_dtype(dt)
    q = torch.randn(B, T, H, K, generator=g, device=device, dtype=acc)
    k = torch.randn(B, T, H, K, generator=g, device=device, dtype=acc)
    v = torch.randn(B, T, H, V, generator=g, device=device, dtype=acc)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g, device=device, dtype=acc))
    return dict(q=q.to(dt), k=k.to(dt), v=v.to(dt), beta=beta.to(dt))


def make_generalized_inputs(B, T, H, K, V, dtype, device, seed=0, initial_state=False, decay=False):
    """The stable IPLR / DPLR family (transitions never expand the state):

        q, v ~ N(0, 1);  k, a = unit-norm rows of two independent N(0, 1) draws;
        b = -lambda a with lambda = sigmoid(N(0, 1)) in (0, 1) per token and head, so I + b a^T = I - lambda a a^T
        has eigenvalues 1 - lambda and 1;
        DPLR: gk = -exp(-1/2) sigmoid(N(0, 1)) in (-0.61, 0) per key channel (RWKV-7's log-decay), so
        diag(exp(gk)) - lambda a a^T has its eigenvalues in (-0.46, 1).

    q, k, v, a, b in `dtype`; gk in float32 (float64 for float64 inputs), as RWKV-7 keeps its decay; S0 ~ N(0, 1)
    / 4 in the accumulation dtype. Drawn in float32 (float64 for float64), then rounded."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    acc = _acc_dtype(dt)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    q = torch.randn(B, T, H, K, generator=g, device=device, dtype=acc)
    k = unit(torch.randn(B, T, H, K, generator=g, device=device, dtype=acc))
    v = torch.randn(B, T, H, V, generator=g, device=device, dtype=acc)
    a = unit(torch.randn(B, T, H, K, generator=g, device=device, dtype=acc))
    lam = torch.sigmoid(torch.randn(B, T, H, 1, generator=g, device=device, dtype=acc))
    out = dict(q=q.to(dt), k=k.to(dt), v=v.to(dt), a=a.to(dt), b=(-lam * a).to(dt))
    if decay:
        out["gk"] = -math.exp(-0.5) * torch.sigmoid(torch.randn(B, T, H, K, generator=g, device=device, dtype=acc))
    if initial_state:
        out["initial_state"] = torch.randn(B, H, K, V, generator=g, device=device, dtype=acc) / 4
    return out


def make_iplr_inputs(B, T, H, K, V, dtype, device, seed=0, initial_state=False):
    """IPLR inputs: make_generalized_inputs without decay."""
    return make_generalized_inputs(B, T, H, K, V, dtype, device, seed=seed, initial_state=initial_state)


def make_dplr_inputs(B, T, H, K, V, dtype, device, seed=0, initial_state=False):
    """DPLR inputs: make_generalized_inputs with the RWKV-7-like decay gk."""
    return make_generalized_inputs(B, T, H, K, V, dtype, device, seed=seed, initial_state=initial_state,
                                   decay=True)


def call_deltaformer(fn, x, output_final_state=False, **kwargs):
    """deltaformer_attn(q, k, v, beta) -> o (ours and fla's; neither has a state). Returns (o, None)."""
    return fn(x["q"], x["k"], x["v"], x["beta"], **kwargs), None


def call_iplr(fn, x, output_final_state=False, **kwargs):
    """fla-style IPLR call: fn(q, k, v, a, b, initial_state=, output_final_state=) -> (o, final or None)."""
    o, ht = fn(x["q"], x["k"], x["v"], x["a"], x["b"], initial_state=x.get("initial_state"),
               output_final_state=output_final_state, **kwargs)
    return o, (ht if output_final_state else None)


def call_dplr(fn, x, output_final_state=False, **kwargs):
    """fla-style DPLR call: fn(q, k, v, a, b, gk, initial_state=, output_final_state=) -> (o, final or None)."""
    o, ht = fn(x["q"], x["k"], x["v"], x["a"], x["b"], x["gk"], initial_state=x.get("initial_state"),
               output_final_state=output_final_state, **kwargs)
    return o, (ht if output_final_state else None)


# Reference adapters: (reference function, float64 leaves, **kwargs) -> (o, final state or None)

def reference_with_state(args):
    """A reference that takes the inputs `args` positionally and initial_state / output_final_state."""
    def call(ref, x, **kwargs):
        o, ht = ref(*(x[n] for n in args), initial_state=x.get("initial_state"), output_final_state=True,
                    **kwargs)[:2]
        return o, ht
    call.__doc__ = f"ref({', '.join(args)}, initial_state=, output_final_state=True) -> (o, final state)"
    return call


def reference_stateless(args):
    """A reference without state: ref(*args) -> o."""
    def call(ref, x, **kwargs):
        return ref(*(x[n] for n in args), **kwargs), None
    call.__doc__ = f"ref({', '.join(args)}) -> o"
    return call


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


def call_sdpa_default(fn, x, output_final_state=False, **kwargs):
    """Causal SDPA on [B, H, T, D] inputs with torch's own backend choice (cuDNN attention on an H100 where torch
    has it). Returns (o, None)."""
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True), None


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
    reference: str | None = None   # 'module:function', float64, evaluated on the GPU in the accuracy sweep
    reference_kwargs: dict = field(default_factory=dict)
    bytes_model: str = "delta_rule"  # key of benchmarks.flops.BYTES
    reference_call: Callable | None = None  # (ref, float64 inputs, **kwargs) -> (o, final or None)
    state: bool = True             # carries a [N, H, K, V] state (initial_state in, final state out)
    reference_max_T: int | None = None      # the reference is too slow or large above this T: no error there
    reference_max_elems: int | None = None  # T^2 references: compare only the first n sequences, n H T^2 <= this
    reference_note: str = ""       # what the reference is and where it stops, for the output files
    label: str = ""

    def call_reference(self, ref, x):
        call = self.reference_call or reference_with_state(("q", "k", "v", "beta"))
        return call(ref, x, **self.reference_kwargs)

    def reference_limits(self, B, T, H):
        """(T to measure at, sequences to compare) for an accuracy point asked at (B, T, H): T capped at
        reference_max_T, sequences at reference_max_elems / (H T^2) (at least 1)."""
        T_eff = min(T, self.reference_max_T) if self.reference_max_T else T
        n = B
        if self.reference_max_elems:
            n = max(1, min(B, self.reference_max_elems // max(1, H * T_eff * T_eff)))
        return T_eff, n


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
    backward: bool = True          # has a backward (fla 0.6.0's IPLR chunk and DPLR fused recurrent do not)
    varlen: bool = True            # takes packed sequences (cu_seqlens)
    requires: tuple = ()           # modules the callable needs at call time (availability imports them)

    @property
    def op(self) -> str:
        return self.family

    def load(self) -> Callable:
        return load(self.target)


# Token-loop references run T sequential steps of small float64 kernels (twice: forward and autograd backward):
# fine to T ~ 1024 on a GPU, minutes beyond.
TOKEN_LOOP_MAX_T = 1024
# DeltaFormer's reference solves with T x T float64 matrices per head (several kept for autograd): up to T = 4096,
# and only as many sequences as keep n H T^2 <= 2^26 elements (H = 4: one sequence at T = 4096, 512 MiB a matrix).
DELTAFORMER_MAX_T = 4096
DELTAFORMER_MAX_ELEMS = 2 ** 26

FAMILIES = {
    "delta_rule": Family("delta_rule", make_delta_rule_inputs, ("q", "k", "v", "beta", "initial_state"),
                         reference="reference:delta_rule_chunkwise", label="delta rule",
                         reference_note="reference.delta_rule_chunkwise (float64, autograd; memory-safe at any T)"),
    "deltaformer": Family("deltaformer", make_deltaformer_inputs, ("q", "k", "v", "beta"),
                          reference="reference:deltaformer_solve",
                          reference_call=reference_stateless(("q", "k", "v", "beta")), state=False,
                          reference_max_T=DELTAFORMER_MAX_T, reference_max_elems=DELTAFORMER_MAX_ELEMS,
                          label="DeltaFormer",
                          reference_note=f"reference.deltaformer_solve (float64 T x T triangular solve, autograd); "
                                         f"T <= {DELTAFORMER_MAX_T}, first sequences only where n H T^2 > "
                                         f"{DELTAFORMER_MAX_ELEMS}"),
    "iplr": Family("iplr", make_iplr_inputs, ("q", "k", "v", "a", "b", "initial_state"),
                   reference="reference:iplr_recurrent",
                   reference_call=reference_with_state(("q", "k", "v", "a", "b")), bytes_model="iplr",
                   reference_max_T=TOKEN_LOOP_MAX_T, label="IPLR delta rule",
                   reference_note=f"reference.iplr_recurrent (float64 token loop, autograd); T <= {TOKEN_LOOP_MAX_T} "
                                  "only (no error is measured above)"),
    "dplr": Family("dplr", make_dplr_inputs, ("q", "k", "v", "a", "b", "gk", "initial_state"),
                   reference="reference:dplr_recurrent",
                   reference_call=reference_with_state(("q", "k", "v", "a", "b", "gk")), bytes_model="dplr",
                   reference_max_T=TOKEN_LOOP_MAX_T, label="DPLR delta rule",
                   reference_note=f"reference.dplr_recurrent (float64 token loop, autograd); T <= {TOKEN_LOOP_MAX_T} "
                                  "only (no error is measured above)"),
    # softmax attention shares the delta rule's q, k, v (a baseline, not held to a reference here)
    "softmax_attention": Family("softmax_attention", make_delta_rule_inputs, ("q", "k", "v"),
                                bytes_model="attention", state=False, label="causal softmax attention"),
}

# The ops the report has a section for, in page order; baselines are shown beside every op.
OPS = ("delta_rule", "deltaformer", "iplr", "dplr")
BASELINES = ("softmax_attention",)

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
    # DeltaFormer: one quadratic form (solve + attention). fla 0.6.0's needs flash-attn (and fla.layers, which
    # fla-core lacks): without them it is recorded as unavailable with the import error.
    Form("deltaformer", "DeltaFormer (ours)", "deltaformer", "parallel", "ours",
         "ops.deltaformer.parallel:deltaformer_attn", call_deltaformer, "deltaformer", final_state=False,
         max_T=16384),
    Form("fla.deltaformer", "DeltaFormer (fla)", "deltaformer", "parallel", "fla",
         "fla.ops.deltaformer:deltaformer_attn", call_deltaformer, "deltaformer", final_state=False,
         max_T=16384, requires=("flash_attn",)),
    # IPLR and DPLR: ops.generalized_delta_rule imports lazily (form.load). fla 0.6.0 has no backward for its IPLR
    # chunk form nor its DPLR fused recurrent form: their fwd+bwd points record the NotImplementedError it raises.
    Form("iplr.chunk", "IPLR chunk (ours)", "iplr", "chunk", "ours",
         "ops.generalized_delta_rule.iplr.chunk:chunk_iplr_delta_rule", call_iplr, "generalized_chunk"),
    Form("iplr.fused_recurrent", "IPLR fused recurrent (ours)", "iplr", "fused_recurrent", "ours",
         "ops.generalized_delta_rule.iplr.fused_recurrent:fused_recurrent_iplr_delta_rule", call_iplr,
         "generalized_recurrent", decode=True),
    Form("fla.iplr.chunk", "IPLR chunk (fla)", "iplr", "chunk", "fla",
         "fla.ops.generalized_delta_rule:chunk_iplr_delta_rule", call_iplr, "generalized_chunk", backward=False),
    Form("fla.iplr.fused_recurrent", "IPLR fused recurrent (fla)", "iplr", "fused_recurrent", "fla",
         "fla.ops.generalized_delta_rule:fused_recurrent_iplr_delta_rule", call_iplr, "generalized_recurrent",
         decode=True),
    Form("dplr.chunk", "DPLR chunk (ours)", "dplr", "chunk", "ours",
         "ops.generalized_delta_rule.dplr.chunk:chunk_dplr_delta_rule", call_dplr, "generalized_chunk"),
    Form("dplr.fused_recurrent", "DPLR fused recurrent (ours)", "dplr", "fused_recurrent", "ours",
         "ops.generalized_delta_rule.dplr.fused_recurrent:fused_recurrent_dplr_delta_rule", call_dplr,
         "generalized_recurrent", decode=True),
    Form("fla.dplr.chunk", "DPLR chunk (fla)", "dplr", "chunk", "fla",
         "fla.ops.generalized_delta_rule:chunk_dplr_delta_rule", call_dplr, "generalized_chunk"),
    Form("fla.dplr.fused_recurrent", "DPLR fused recurrent (fla)", "dplr", "fused_recurrent", "fla",
         "fla.ops.generalized_delta_rule:fused_recurrent_dplr_delta_rule", call_dplr, "generalized_recurrent",
         decode=True, backward=False),
    Form("sdpa", "causal SDPA (torch)", "softmax_attention", "sdpa", "torch",
         "benchmarks.registry:sdpa", call_sdpa, "softmax_attention", final_state=False, accuracy=False,
         adapt_inputs=to_attention_inputs),
    Form("sdpa.default", "causal SDPA (torch, default backend)", "softmax_attention", "sdpa", "torch",
         "benchmarks.registry:sdpa", call_sdpa_default, "softmax_attention", final_state=False, accuracy=False,
         adapt_inputs=to_attention_inputs),
]

BY_NAME = {f.name: f for f in FORMS}


def get(name: str) -> Form:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown form {name!r}; known: {', '.join(BY_NAME)}") from None


def availability(form: Form):
    """(True, '') if the form's callable and every module it requires import, else (False, reason): the import
    errors, e.g. 'unavailable: ModuleNotFoundError: No module named 'flash_attn''."""
    errors = []
    try:
        form.load()
    except Exception as e:  # ImportError, AttributeError, SyntaxError, a module's own init errors
        errors.append(f"{type(e).__name__}: {e}")
    for module in form.requires:
        try:
            importlib.import_module(module)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    if errors:
        return False, "unavailable: " + "; ".join(errors)
    return True, ""


def op_of(form_name: str, forms_meta: dict | None = None) -> str | None:
    """The op a form belongs to (its family; None for a baseline), from the registry or a data file's forms."""
    f = BY_NAME.get(form_name)
    fam = f.family if f else ((forms_meta or {}).get(form_name) or {}).get("op")
    if fam in BASELINES:
        return None
    return fam or "delta_rule"  # data written before families had names held the delta rule only


def op_subset(doc: dict, op: str, keys, baselines: bool = True):
    """A data file's document (bench.json, accuracy.json, point-*.json) with the rows under each of `keys`
    restricted to op's forms (and the baselines, e.g. SDPA, when asked), or None when the op has no row there (a
    baseline alone does not count)."""
    if not doc:
        return None
    meta = doc.get("forms") or {}
    out, found = dict(doc), False
    for key in keys:
        rows = []
        for r in doc.get(key) or []:
            o = op_of(r.get("form", ""), meta)
            found |= o == op
            if o == op or (o is None and baselines):
                rows.append(r)
        out[key] = rows
    return out if found else None
