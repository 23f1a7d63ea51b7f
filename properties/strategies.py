"""Shared hypothesis strategies. Hypothesis draws the structure of a case (shapes, dtype, flags, segment lengths,
a seed); tensors are then drawn from torch with that seed, fresh for every example.

Sizes adapt to where the tests run: on CPU the Triton interpreter is slow, so T, K and V stay small."""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

# Dtypes the Triton ops are tested in here. bf16 is GPU-only: the interpreter's bf16 tl.dot is unreliable.
OP_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64] if ON_GPU else \
    [torch.float16, torch.float32, torch.float64]

# Head sizes: powers of two and not (1, 24, 60, 100, ...), capped smaller on the interpreter.
HEAD_SIZES = [1, 16, 24, 32, 60, 64, 100, 128, 256] if ON_GPU else [1, 3, 8, 16, 24]
MAX_T = int(os.environ.get("DELTACHECK_MAX_T", 300 if ON_GPU else 70))


@dataclass
class Case:
    """A drawn delta-rule case; `make()` materializes its tensors."""
    B: int
    T: int
    H: int
    K: int
    V: int
    dtype: torch.dtype
    seed: int
    unit_keys: bool
    beta_max: float
    beta_ends: bool
    initial_state: bool
    seqlens: tuple | None  # packed segment lengths (B == 1) or None
    scale: float | None

    @property
    def N(self):
        return self.B if self.seqlens is None else len(self.seqlens)

    def cu_seqlens(self, device=DEVICE):
        if self.seqlens is None:
            return None
        cu = [0]
        for n in self.seqlens:
            cu.append(cu[-1] + n)
        return torch.tensor(cu, dtype=torch.long, device=device)

    def make(self, device=DEVICE):
        """q, k, v, beta, initial_state in self.dtype (state: float32, or float64 for float64 cases)."""
        g = torch.Generator().manual_seed(self.seed)
        B, T, H, K, V = self.B, self.T, self.H, self.K, self.V
        q = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
        k = torch.randn(B, T, H, K, generator=g, dtype=torch.float64)
        k = torch.nn.functional.normalize(k, dim=-1) if self.unit_keys else k / K ** 0.5
        v = torch.randn(B, T, H, V, generator=g, dtype=torch.float64)
        beta = torch.rand(B, T, H, generator=g, dtype=torch.float64) * self.beta_max
        if self.beta_ends:  # put a share of the betas exactly on 0 and on beta_max
            r = torch.rand(B, T, H, generator=g)
            beta = torch.where(r < 0.15, 0.0, torch.where(r > 0.85, self.beta_max, beta))
        S0 = torch.randn(self.N, H, K, V, generator=g, dtype=torch.float64) if self.initial_state else None
        cast = lambda x: x.to(device=device, dtype=self.dtype)  # noqa: E731
        state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        return dict(q=cast(q), k=cast(k), v=cast(v), beta=cast(beta),
                    initial_state=None if S0 is None else S0.to(device=device, dtype=state_dtype),
                    cu_seqlens=self.cu_seqlens(device), scale=self.scale)


@st.composite
def seqlens(draw, max_total):
    """Packed segment lengths including 0 and 1, summing to at most max_total."""
    n = draw(st.integers(1, 4))
    lens = draw(st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, max(2, max_total // n))),
                         min_size=n, max_size=n))
    return tuple(lens)


@st.composite
def delta_cases(draw, dtypes=None, max_T=None, head_sizes=None, varlen=None, max_B=2, max_H=2):
    """A delta-rule case: T from 1 to max_T (not tied to any chunk size), K != V allowed, odd head sizes,
    unit-norm keys with beta in [0, 2] (ends included) or raw keys with beta in [0, 1], optional initial state,
    optional packed varlen with empty and length-1 segments, optional explicit scale."""
    dtypes = dtypes or OP_DTYPES
    max_T = max_T or MAX_T
    head_sizes = head_sizes or HEAD_SIZES
    use_varlen = draw(st.booleans()) if varlen is None else varlen
    if use_varlen:
        lens = draw(seqlens(max_T))
        B, T = 1, sum(lens)
    else:
        lens, B, T = None, draw(st.integers(1, max_B)), draw(st.integers(1, max_T))
    unit_keys = draw(st.booleans())
    return Case(
        B=B, T=T, H=draw(st.integers(1, max_H)),
        K=draw(st.sampled_from(head_sizes)), V=draw(st.sampled_from(head_sizes)),
        dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2 ** 31 - 1)),
        unit_keys=unit_keys, beta_max=2.0 if unit_keys else 1.0, beta_ends=draw(st.booleans()),
        initial_state=draw(st.booleans()), seqlens=lens,
        scale=draw(st.one_of(st.none(), st.floats(0.1, 2.0))),
    )


def fixed_case(**kw) -> Case:
    """A hand-written Case for @example edge cases: one token, head size 1, float32 unless overridden; with
    `seqlens` the batch is packed (B = 1, T = their sum)."""
    base = dict(B=1, T=1, H=1, K=1, V=1, dtype=torch.float32, seed=0, unit_keys=True, beta_max=2.0,
                beta_ends=False, initial_state=True, seqlens=None, scale=None)
    base.update(kw)
    if base["seqlens"] is not None:
        base.update(B=1, T=sum(base["seqlens"]))
    return Case(**base)


def with_examples(cases, **extra):
    """Decorator: add each Case in `cases` as a hypothesis @example (with the other arguments fixed to `extra`)."""
    from hypothesis import example

    def add(test):
        for c in cases:
            test = example(case=c, **extra)(test)
        return test
    return add


def low_rank(case, family):
    """a, b per token (float64, CPU): the stable family b = -lambda a with |a| = 1 and lambda in [0, 2]
    (transitions I - lambda a a^T, norm <= 1), or raw independent a, b with entries N(0, 1/4K)."""
    g = torch.Generator().manual_seed(case.seed + 2)
    shape = (case.B, case.T, case.H, case.K)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    if family == "raw":
        s = 0.5 / case.K ** 0.5
        return a * s, torch.randn(shape, generator=g, dtype=torch.float64) * s
    lam = 2 * torch.rand(shape[:-1], generator=g, dtype=torch.float64)[..., None]
    a = F.normalize(a, dim=-1)
    return a, -lam * a


def log_decay(case, low, ends=False):
    """gk = low * U(0, 1) per key channel (float64, CPU); with ends, 15% of the entries exactly `low` and 15%
    exactly 0 (channels that do not decay next to ones that decay hard)."""
    g = torch.Generator().manual_seed(case.seed + 3)
    shape = (case.B, case.T, case.H, case.K)
    gk = low * torch.rand(shape, generator=g, dtype=torch.float64)
    if ends:
        r = torch.rand(shape, generator=g, dtype=torch.float64)
        gk = torch.where(r < 0.15, low, torch.where(r > 0.85, 0.0, gk))
    return gk


def bad_input_maker(**extra):
    """make(shape=(B, T, H, K, V), **changes): an op's keyword inputs q, k, v ~ N(0, 1) (and each of `extra`'s
    names, drawn by its function of (B, T, H, K)) at (1, 6, 2, 4, 3) or `shape`, with `changes` applied, on
    DEVICE: the base that the bad-input tests break one argument of."""
    def make(**kw):
        B, T, H, K, V = kw.pop("shape", (1, 6, 2, 4, 3))
        args = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V))
        args.update({n: draw(B, T, H, K) for n, draw in extra.items()})
        args.update(kw)
        return {n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for n, x in args.items()}
    return make


def common_bad_inputs(make):
    """(inputs, the argument its error must name) every op with q, k, v, cu_seqlens and initial_state refuses:
    cu_seqlens not starting at 0, decreasing, or with B > 1; an initial state of the wrong shape (also for the
    packed sequences); head sizes over 256; k and v in another dtype than q."""
    return [
        (make(cu_seqlens=torch.tensor([1, 6])), "cu_seqlens"),
        (make(cu_seqlens=torch.tensor([0, 4, 2, 6])), "cu_seqlens"),
        (make(shape=(2, 6, 2, 4, 3), cu_seqlens=torch.tensor([0, 3, 6])), "cu_seqlens"),
        (make(initial_state=torch.randn(1, 2, 3, 4)), "initial_state"),
        (make(cu_seqlens=torch.tensor([0, 3, 6]), initial_state=torch.randn(1, 2, 4, 3)), "initial_state"),
        (make(shape=(1, 6, 2, 300, 3)), "head size"),
        (make(shape=(1, 6, 2, 4, 300)), "head size"),
        (make(k=torch.randn(1, 6, 2, 4, dtype=torch.float64)), "k"),
        (make(v=torch.randn(1, 6, 2, 3, dtype=torch.float16)), "v"),
    ]
