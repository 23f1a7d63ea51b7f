"""Properties of the IPLR delta rule ops (ops.generalized_delta_rule: chunk and fused recurrent) against the float64
token-by-token reference: S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t.

Also holds the helpers the DPLR and forms-agree properties share (input families, the op-vs-reference check)."""
import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import ops.common.utils as utils
import ops.generalized_delta_rule.dplr.chunk_A as chunk_A
import ops.generalized_delta_rule.dplr.chunk_h as chunk_h
import ops.generalized_delta_rule.dplr.chunk_o as chunk_o
import ops.generalized_delta_rule.dplr.fused_recurrent as fused_recurrent
import ops.generalized_delta_rule.dplr.wy_fast as wy_fast
import reference
from ops.generalized_delta_rule import chunk_iplr_delta_rule, fused_recurrent_iplr_delta_rule
from properties.strategies import DEVICE, OP_DTYPES, Case, delta_cases
from properties.tolerances import assert_close

GRAD_NAMES = ("q", "k", "v", "a", "b", "gk", "initial_state")
CHUNK_SIZES = (16, 32, 64)
RAW_MAX_T = 24  # raw (unnormalized) a, b are drawn at small T only: their transitions may grow the state


def case_(**kw):
    """A fixed Case (for @example edge cases)."""
    base = dict(B=1, T=1, H=1, K=1, V=1, dtype=torch.float32, seed=0, unit_keys=True, beta_max=2.0,
                beta_ends=False, initial_state=True, seqlens=None, scale=None)
    base.update(kw)
    if base["seqlens"] is not None:
        base.update(B=1, T=sum(base["seqlens"]))
    return Case(**base)


# Edge cases every run sees: one token and head size 1; packed empty and length-1 segments and partial chunks;
# K != V with odd sizes in half precision without initial state.
EDGE_CASES = [
    case_(),
    case_(K=3, V=1, dtype=torch.float64, seqlens=(0, 1, 21, 0, 17)),
    case_(B=2, T=35, H=2, K=24, V=3, dtype=torch.float16, unit_keys=False, initial_state=False),
]


def edge_examples(**extra):
    def add(test):
        for c in EDGE_CASES:
            test = example(case=c, **extra)(test)
        return test
    return add


def nonempty(case):
    """The case, or a small one with an empty and a length-1 segment when it has no tokens (T = 0 is checked in
    the empty-input properties; the reference cannot assemble an empty output)."""
    if case.T == 0:
        return dataclasses.replace(case, B=1, T=3, seqlens=(1, 0, 2))
    return case


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


def inputs(case, family="stable", decay=None, ends=False, gk_dtype=None):
    """The case's q, k, v, initial_state, cu_seqlens, scale plus a, b (and gk = decay * U(0, 1) when decay is
    given, in gk_dtype or the case dtype), on DEVICE."""
    x = case.make()
    x.pop("beta")
    a, b = low_rank(case, family)
    x["a"], x["b"] = (t.to(device=DEVICE, dtype=case.dtype) for t in (a, b))
    if decay is not None:
        x["gk"] = log_decay(case, decay, ends).to(device=DEVICE, dtype=gk_dtype or case.dtype)
    return x


def leaves(x):
    names = [n for n in GRAD_NAMES if x.get(n) is not None]
    ours = {n: x[n].detach().clone().requires_grad_() for n in names}
    refs = {n: x[n].detach().double().requires_grad_() for n in names}
    return ours, refs


def upstream(o, ht, seed):
    """Random upstream gradients for o and (when returned) the final state."""
    g = torch.Generator().manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    if ht is None:
        return (o,), (do,)
    dht = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(device=ht.device, dtype=ht.dtype)
    return (o, ht), (do, dht)


def check_op(op, ref, x, dtype, record, output_final_state=True, gradients=True):
    """op and the float64 reference on the same inputs: o and the final state within the forward bound (and in
    the right dtypes); with random upstream gradients, every input's gradient within the gradient bound."""
    ours, refs = leaves(x)
    kw = dict(scale=x["scale"], output_final_state=output_final_state, cu_seqlens=x["cu_seqlens"])
    o, ht = op(**ours, **kw)
    ro, rht = ref(**refs, **kw)
    assert o.dtype == dtype and o.shape == ro.shape
    assert_close("o", o, ro, dtype, "forward", record=record)
    if output_final_state:
        assert ht.dtype == utils.acc_dtype(dtype)
        assert_close("final_state", ht, rht, dtype, "forward", record=record)
    else:
        assert ht is None
    if not gradients:
        return
    outs, grads_out = upstream(o, ht, 0)
    grads = torch.autograd.grad(outs, list(ours.values()), grads_out)
    routs = (ro, rht) if output_final_state else (ro,)
    rgrads = torch.autograd.grad(routs, list(refs.values()), [g.double() for g in grads_out], allow_unused=True,
                                 materialize_grads=True)
    for name, xx, gx, rgx in zip(ours, ours.values(), grads, rgrads):
        assert gx.dtype == xx.dtype and gx.shape == xx.shape, name
        assert_close(f"d{name}", gx, rgx, dtype, "gradient", record=record)


@contextlib.contextmanager
def small_tiles(enabled):
    """Lower every tile so the small interpreter head sizes still take the multi-tile paths (several K tiles,
    several V blocks of the state, partial sums over V blocks in the fused recurrent backward)."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            for mod in (chunk_A, wy_fast, chunk_o):
                mp.setattr(mod, "TILE", 16)
            mp.setattr(chunk_h, "BUDGET", 256)
            mp.setattr(fused_recurrent, "FWD_TILE", 64)
            mp.setattr(fused_recurrent, "BWD_TILE", 64)
        yield


def with_fields(record, **fields):
    """record, tagging each measurement with extra fields (chunk size, input family, ...)."""
    return lambda name, err, bound, **kw: record(name, err, bound, **fields, **kw)


def chunk_op(chunk_size, fn):
    return lambda **kw: fn(**kw, chunk_size=chunk_size)


@given(case=delta_cases(), family=st.sampled_from(["stable", "raw"]), chunk_size=st.sampled_from(CHUNK_SIZES),
       tiles=st.booleans(), output_final_state=st.booleans())
@edge_examples(family="stable", chunk_size=16, tiles=True, output_final_state=True)
@example(case=EDGE_CASES[2], family="stable", chunk_size=64, tiles=False, output_final_state=True)
def test_chunk_iplr_matches_reference(case, family, chunk_size, tiles, output_final_state, record):
    """chunk_iplr_delta_rule's o and final state equal the float64 reference within the forward bound, and its
    gradients for q, k, v, a, b and initial_state (random upstream gradients) within the gradient bound, for the
    stable family b = -lambda a and for raw small a, b (small T), any chunk size and tile split."""
    case = nonempty(case)
    if family == "raw" and case.T > RAW_MAX_T:
        family = "stable"
    x = inputs(case, family)
    with small_tiles(tiles):
        check_op(chunk_op(chunk_size, chunk_iplr_delta_rule), reference.iplr_recurrent, x, case.dtype,
                 with_fields(record, chunk_size=chunk_size, family=family), output_final_state)


@given(case=delta_cases(), family=st.sampled_from(["stable", "raw"]), tiles=st.booleans(),
       output_final_state=st.booleans())
@edge_examples(family="stable", tiles=True, output_final_state=True)
def test_fused_recurrent_iplr_matches_reference(case, family, tiles, output_final_state, record):
    """fused_recurrent_iplr_delta_rule's o, final state and all input gradients equal the float64 reference
    within the forward / gradient bounds (also with V split over programs, whose partials are summed)."""
    case = nonempty(case)
    if family == "raw" and case.T > RAW_MAX_T:
        family = "stable"
    x = inputs(case, family)
    with small_tiles(tiles):
        check_op(fused_recurrent_iplr_delta_rule, reference.iplr_recurrent, x, case.dtype,
                 with_fields(record, family=family), output_final_state)


def test_fused_recurrent_iplr_checkpoint_segments(monkeypatch, record):
    """The fused recurrent backward walks checkpointed segments: with a short segment (4 tokens) a sequence
    spans many segments and segment ends fall inside packed sequences; gradients still match the reference."""
    monkeypatch.setattr(fused_recurrent, "CK", 4)
    case = case_(K=5, V=3, H=2, dtype=torch.float64, seqlens=(9, 0, 1, 4, 13), seed=5)
    check_op(fused_recurrent_iplr_delta_rule, reference.iplr_recurrent, inputs(case), case.dtype, record)


def gradcheck_inputs(varlen, decay):
    """Tiny float64 inputs (one packed layout with an empty and a length-1 segment) and cu_seqlens."""
    g = torch.Generator().manual_seed(7)
    if varlen:  # segments of 4, 0 and 1 tokens
        B, T, N, cu = 1, 5, 3, torch.tensor([0, 4, 4, 5], device=DEVICE)
    else:
        B, T, N, cu = 2, 4, 2, None
    H, K, V = 1, 3, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    a = F.normalize(rnd(B, T, H, K), dim=-1)
    b = -1.5 * torch.rand(B, T, H, 1, generator=g, dtype=torch.float64).to(DEVICE) * a + 0.1 * rnd(B, T, H, K)
    args = [rnd(B, T, H, K), rnd(B, T, H, K) / 2, rnd(B, T, H, V), a, b]
    if decay:
        args.append(-torch.rand(B, T, H, K, generator=g, dtype=torch.float64).to(DEVICE) * 2)
    args.append(rnd(N, H, K, V))
    return [x.requires_grad_() for x in args], cu


def gradcheck_fast(form, varlen):
    """The chunk form's full Jacobian takes minutes in the interpreter: it is checked in fast mode (random
    projections u^T J v, numerical against analytical); the fused recurrent form gets the full Jacobian on the
    packed layout (empty and length-1 segments) and fast mode otherwise."""
    return form == "chunk" or not varlen


@pytest.mark.parametrize("form", ["chunk", "fused_recurrent"])
@pytest.mark.parametrize("varlen", [False, True])
def test_iplr_gradcheck(form, varlen):
    """float64 torch.autograd.gradcheck of the Triton backward (q, k, v, a, b, initial_state through o and the
    final state) on tiny shapes, packed layout with an empty and a length-1 segment included."""
    args, cu = gradcheck_inputs(varlen, decay=False)
    fn = {"chunk": chunk_op(16, chunk_iplr_delta_rule), "fused_recurrent": fused_recurrent_iplr_delta_rule}[form]

    def f(q, k, v, a, b, h0):
        return fn(q=q, k=k, v=v, a=a, b=b, scale=0.8, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=gradcheck_fast(form, varlen))


OPS = {"chunk": chunk_iplr_delta_rule, "fused_recurrent": fused_recurrent_iplr_delta_rule}


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_iplr_nan_in_q_gives_nan_in_o(form, dtype):
    """A NaN in q makes the o row it feeds NaN (no crash) and leaves every other output finite."""
    case = case_(B=2, T=3, H=2, K=8, V=4, dtype=dtype, seed=3)
    x = inputs(case)
    x["q"][1, 2, 0, 5] = math.nan
    o, ht = OPS[form](x["q"], x["k"], x["v"], x["a"], x["b"], initial_state=x["initial_state"],
                      output_final_state=True)
    bad = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
    bad[1, 2, 0] = True
    assert torch.isnan(o[bad]).all()
    assert torch.isfinite(o[~bad]).all() and torch.isfinite(ht).all()


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("varlen", [False, True])
def test_iplr_empty_input(form, varlen):
    """T = 0 (or only empty segments): o is empty, the final state is the initial state (zeros without one),
    and the initial state's gradient is the final state's upstream gradient."""
    H, K, V = 2, 3, 5
    B, N, cu = (1, 3, torch.zeros(4, dtype=torch.long, device=DEVICE)) if varlen else (2, 2, None)
    q = torch.randn(B, 0, H, K, device=DEVICE, requires_grad=True)
    v = torch.randn(B, 0, H, V, device=DEVICE, requires_grad=True)
    h0 = torch.randn(N, H, K, V, device=DEVICE, requires_grad=True)
    o, ht = OPS[form](q, q, v, q, q, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (B, 0, H, V)
    assert torch.equal(ht, h0)
    dht = torch.randn_like(ht)
    dq, dv, dh0 = torch.autograd.grad((o, ht), (q, v, h0), (torch.zeros_like(o), dht))
    assert torch.equal(dh0, dht) and dq.shape == q.shape and dv.shape == v.shape
    _, ht = OPS[form](q, q, v, q, q, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(ht, torch.zeros(N, H, K, V, device=DEVICE))


def bad(**kw):
    B, T, H, K, V = kw.pop("shape", (1, 6, 2, 4, 3))
    args = dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, H, K), v=torch.randn(B, T, H, V),
                a=torch.randn(B, T, H, K), b=torch.randn(B, T, H, K))
    args.update(kw)
    return {n: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for n, x in args.items()}


BAD_INPUTS = [
    (bad(a=torch.randn(1, 6, 2)), "a"),
    (bad(a=torch.randn(1, 6, 2, 5)), "a"),
    (bad(a=torch.randn(1, 6, 2, 4, dtype=torch.float64)), "a"),
    (bad(b=torch.randn(1, 6, 2, 3)), "b"),
    (bad(b=[1.0]), "b"),
    (bad(b=torch.ones(1, 6, 2, 4, dtype=torch.long)), "b"),
    (bad(cu_seqlens=torch.tensor([1, 6])), "cu_seqlens"),
    (bad(cu_seqlens=torch.tensor([0, 4, 2, 6])), "cu_seqlens"),
    (bad(shape=(2, 6, 2, 4, 3), cu_seqlens=torch.tensor([0, 3, 6])), "cu_seqlens"),
    (bad(initial_state=torch.randn(1, 2, 3, 4)), "initial_state"),
    (bad(cu_seqlens=torch.tensor([0, 3, 6]), initial_state=torch.randn(1, 2, 4, 3)), "initial_state"),
    (bad(shape=(1, 6, 2, 300, 3)), "head size"),
    (bad(shape=(1, 6, 2, 4, 300)), "head size"),
    (bad(k=torch.randn(1, 6, 2, 4, dtype=torch.float64)), "k"),
    (bad(v=torch.randn(1, 6, 2, 3, dtype=torch.float16)), "v"),
    (bad(scale="1"), "scale"),
]


@pytest.mark.parametrize("form", list(OPS))
@pytest.mark.parametrize("kwargs, match", BAD_INPUTS)
def test_iplr_rejects_bad_input(form, kwargs, match):
    """Malformed input raises a ValueError or TypeError that names the offending argument."""
    with pytest.raises((ValueError, TypeError), match=match):
        OPS[form](**kwargs)


@pytest.mark.parametrize("chunk_size", [0, 8, 48, 128, 64.0, True])
def test_chunk_iplr_rejects_bad_chunk_size(chunk_size):
    """chunk_size outside (16, 32, 64) raises a ValueError naming chunk_size."""
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_iplr_delta_rule(**bad(), chunk_size=chunk_size)
