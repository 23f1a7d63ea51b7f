"""The suite as a conformance test: the same properties held against any implementation of an op.

Implementations under test are benchmarks/registry.py's forms (ours, fla's when it imports), one registry for the
benchmarks and the properties, each with its declared capabilities (dtypes, backward, packed sequences). Select
them with DELTACHECK_IMPLS: comma-separated form names, or `ours` (the default), `fla`, `all`; e.g.

    DELTACHECK_IMPLS=fla python3 -m pytest properties/test_conformance.py       # or: nox -s conformance -- fla

Every (property, implementation, dtype) is one test. What an implementation declares it does not support (a
dtype it refuses, no backward, no packed sequences) or what does not import is recorded as `unsupported` with the
reason (the report's conformance table shows it) and the test is skipped saying so, never counted as a pass.
Errors are held to the float64 reference of the op's family on the same rounded inputs, with the dtype bounds of
properties/tolerances.py.
"""
import os
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import registry as R
from properties.strategies import DEVICE, ON_GPU
from properties.tolerances import assert_close, keep, rel_err, result_bound

FAMILIES_WITH_REFERENCE = [name for name, fam in R.FAMILIES.items() if fam.reference]
CPU_DTYPES = ("float32",)  # the interpreter is slow: the rest of the suite covers fp16 / fp64 for our forms
GPU_DTYPES = ("float16", "bfloat16", "float32", "float64")
HEAD_SIZES = (16, 32, 64, 128) if ON_GPU else (8, 16)
MAX_T = 200 if ON_GPU else 40
NAN_AT, BLOCK = 80, 64
EXAMPLES = int(os.environ.get("DELTACHECK_CONFORMANCE_EXAMPLES", 6 if ON_GPU else 2))


def selected_forms(spec=None):
    """The forms DELTACHECK_IMPLS names (form names, or the providers `ours` / `fla`, or `all`)."""
    spec = spec if spec is not None else os.environ.get("DELTACHECK_IMPLS", "ours")
    forms = [f for f in R.FORMS if f.family in FAMILIES_WITH_REFERENCE and f.accuracy]
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            out += forms
        elif item in ("ours", "fla"):
            out += [f for f in forms if f.provider == item]
        else:
            out.append(R.get(item))
    return list({f.name: f for f in out}.values())


def _cases():
    dtypes = GPU_DTYPES if ON_GPU else CPU_DTYPES
    return [pytest.param(f, d, id=f"{f.name}-{R.SHORT[d]}") for f in selected_forms() for d in dtypes]


def unsupported(form, prop, reason):
    """Record that `form` does not support what property `prop` needs, then skip saying so."""
    keep(f"{prop}: unsupported", 0.0, 0.0, impl=form.name, prop=prop, status="unsupported", reason=reason)
    pytest.skip(f"unsupported by {form.name}: {reason}")


def _load(form, prop, dtype):
    ok, why = R.availability(form)
    if not ok:
        unsupported(form, prop, why)
    if form.dtypes and dtype not in form.dtypes:
        unsupported(form, prop, f"dtype {dtype} (declares {', '.join(form.dtypes)})")
    if form.provider != "ours" and not ON_GPU:
        unsupported(form, prop, "runs on a GPU only (its kernels autotune, which the Triton interpreter cannot)")
    if dtype == "bfloat16" and not ON_GPU:
        unsupported(form, prop, "bfloat16 tl.dot is unreliable in the Triton interpreter (GPU only)")
    return form.load()


def _inputs(form, B, T, H, K, V, dtype, seed, initial_state):
    fam = R.FAMILIES[form.family]
    x = fam.make_inputs(B, T, H, K, V, dtype, DEVICE, seed=seed, initial_state=initial_state and fam.state)
    return x if form.adapt_inputs is None else form.adapt_inputs(x)


def _grads(outs, gouts, leaves):
    """Autograd gradients of sum(out * gout) for the leaves, or None when the form has no backward."""
    try:
        return torch.autograd.grad(outs, list(leaves.values()), gouts, allow_unused=True)
    except NotImplementedError:
        return None


def _keeper(form, prop):
    """A `record` for assert_close that tags each error with the implementation, the property and pass / fail."""
    def rec(name, err, b, **kw):
        keep(name, err, b, impl=form.name, prop=prop, status="pass" if err <= b else "fail", **kw)
    return rec


def _record(form, prop, name, x, ref, dtype, kind):
    """(error, bound) of x against ref, recorded (not asserted: the caller asserts after every quantity)."""
    err, b = rel_err(x, ref), result_bound(x, ref, R.torch_dtype(dtype), kind)
    _keeper(form, prop)(name, err, b, dtype=dtype, kind=kind)
    return err, b


def _compare_with_reference(form, fn, x, dtype, prop, seed):
    """o, the final state and every gradient (random upstream gradients) of `form` on inputs x against the family's
    float64 reference on the same rounded inputs; records each error; returns why gradients were not compared
    (the form has no backward) or None. Asserts every error is within its bound."""
    fam = R.FAMILIES[form.family]
    names = [n for n in fam.grad_names if n in x]
    leaves = {n: x[n].detach().clone().requires_grad_() for n in names}
    o, ht = form.call(fn, dict(x, **leaves), form.final_state and fam.state, **form.kwargs)
    ref_leaves = {n: x[n].detach().double().requires_grad_() for n in names}
    with torch.device(DEVICE):
        ro, rht = fam.call_reference(R.load(fam.reference), dict({k: v.double() for k, v in x.items()},
                                                                  **ref_leaves))
    g = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    do = torch.randn(o.shape, generator=g, device=DEVICE, dtype=torch.float64)
    outs, gouts, routs, rgouts = [o], [do.to(o.dtype)], [ro], [do]
    errors = [_record(form, prop, "o", o, ro, dtype, "forward")]
    if ht is not None and rht is not None:
        dht = torch.randn(ht.shape, generator=g, device=DEVICE, dtype=torch.float64)
        outs.append(ht)
        gouts.append(dht.to(ht.dtype))
        routs.append(rht)
        rgouts.append(dht)
        errors.append(_record(form, prop, "final_state", ht, rht, dtype, "forward"))
    no_backward = None
    grads = _grads(outs, gouts, leaves) if form.backward else None
    if grads is None:
        no_backward = "no backward (declared)" if not form.backward else "no backward (NotImplementedError)"
    else:
        rgrads = torch.autograd.grad(routs, list(ref_leaves.values()), rgouts, allow_unused=True,
                                     materialize_grads=True)
        for n, gx, rg in zip(names, grads, rgrads):
            if gx is None:
                errors.append((float("inf"), 0.0))
                keep(f"d{n}", float("inf"), 0.0, impl=form.name, prop=prop, status="fail", dtype=dtype,
                     kind="gradient", reason="no gradient returned")
                continue
            errors.append(_record(form, prop, f"d{n}", gx, rg, dtype, "gradient"))
    bad = [(e, b) for e, b in errors if not e <= b]
    assert not bad, f"{form.name}: errors over their bounds: {bad}"
    return no_backward


@pytest.mark.parametrize("form,dtype", _cases())
def test_matches_float64_reference(form, dtype):
    """o, the final state and the gradient of every differentiable input equal the family's float64 reference on
    the same rounded inputs, within the dtype's forward / gradient bounds (initial state included)."""
    prop = "matches_float64_reference"
    fn = _load(form, prop, dtype)
    state = {"no_backward": None}

    @settings(max_examples=EXAMPLES)
    @given(T=st.integers(1, MAX_T), H=st.integers(1, 2), K=st.sampled_from(HEAD_SIZES),
           V=st.sampled_from(HEAD_SIZES), B=st.integers(1, 2), initial_state=st.booleans(),
           seed=st.integers(0, 2 ** 20))
    def check(T, H, K, V, B, initial_state, seed):
        x = _inputs(form, B, T, H, K, V, dtype, seed, initial_state)
        state["no_backward"] = _compare_with_reference(form, fn, x, dtype, prop, seed)

    check()
    if state["no_backward"]:
        unsupported(form, prop + " (gradients)", state["no_backward"])


@pytest.mark.parametrize("form,dtype", [c for c in _cases() if c.values[0].family == "dplr"])
def test_strong_decay_stays_finite_and_accurate(form, dtype):
    """With log decays gk drawn in [-20, 0] per step and channel (a share exactly -20, as strong as the DPLR ops
    promise), o, the final state and every gradient stay finite and within the bounds of the float64 reference."""
    prop = "strong_decay_stays_finite_and_accurate"
    fn = _load(form, prop, dtype)
    state = {"no_backward": None}

    @settings(max_examples=EXAMPLES)
    @given(T=st.integers(1, MAX_T), K=st.sampled_from(HEAD_SIZES), V=st.sampled_from(HEAD_SIZES),
           initial_state=st.booleans(), seed=st.integers(0, 2 ** 20))
    def check(T, K, V, initial_state, seed):
        x = _inputs(form, 1, T, 2, K, V, dtype, seed, initial_state)
        g = torch.Generator(device=DEVICE).manual_seed(seed + 2)
        u = torch.rand(x["gk"].shape, generator=g, device=DEVICE, dtype=x["gk"].dtype)
        x["gk"] = torch.where(u > 0.8, -20.0, -20.0 * u / 0.8).to(x["gk"].dtype)
        state["no_backward"] = _compare_with_reference(form, fn, x, dtype, prop, seed)

    check()
    if state["no_backward"]:
        unsupported(form, prop + " (gradients)", state["no_backward"])


@pytest.mark.parametrize("form,dtype", _cases())
def test_bad_input_names_the_argument(form, dtype):
    """A 3-D q (a missing head axis) is refused before anything runs, with an error that names q."""
    prop = "bad_input_names_the_argument"
    fn = _load(form, prop, dtype)
    fam = R.FAMILIES[form.family]
    x = _inputs(form, 1, 8, 1, HEAD_SIZES[0], HEAD_SIZES[0], dtype, 3, False)
    x["q"] = x["q"][:, :, 0]
    try:
        form.call(fn, x, form.final_state and fam.state, **form.kwargs)
        message = None
    except Exception as e:  # any refusal counts; its message is what the property reads
        message = f"{type(e).__name__}: {e}"
    ok = message is not None and re.search(r"\bq\b", message) is not None
    keep("error names q", 0.0 if ok else 1.0, 0.0, impl=form.name, prop=prop, status="pass" if ok else "fail",
         dtype=dtype, reason=message or "no error")
    assert message is not None, f"{form.name} accepted a 3-D q"
    assert ok, f"{form.name}'s error does not name q: {message[:200]}"


@pytest.mark.parametrize("form,dtype", _cases())
def test_packed_sequences_equal_each_alone(form, dtype):
    """Sequences packed with cu_seqlens (lengths including 0 and 1, each with its own initial state) give each
    sequence's output and final state as calling the op on it alone, to the dtype's forward bound."""
    prop = "packed_sequences_equal_each_alone"
    fn = _load(form, prop, dtype)
    if not form.varlen:
        unsupported(form, prop, "no packed sequences (cu_seqlens)")
    fam = R.FAMILIES[form.family]

    @settings(max_examples=EXAMPLES)
    @given(lens=st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(2, MAX_T // 2)), min_size=1, max_size=3),
           H=st.integers(1, 2), K=st.sampled_from(HEAD_SIZES), V=st.sampled_from(HEAD_SIZES),
           seed=st.integers(0, 2 ** 20))
    def check(lens, H, K, V, seed):
        parts = [_inputs(form, 1, n, H, K, V, dtype, seed + i, True) for i, n in enumerate(lens)]
        packed = {k: torch.cat([p[k] for p in parts], 0 if k == "initial_state" else 1) for k in parts[0]}
        cu = torch.tensor([0] + [sum(lens[:i + 1]) for i in range(len(lens))], dtype=torch.int32, device=DEVICE)
        with torch.no_grad():
            o, ht = form.call(fn, packed, form.final_state and fam.state, cu_seqlens=cu, **form.kwargs)
            for i, (p, n) in enumerate(zip(parts, lens)):
                oi, hti = form.call(fn, p, form.final_state and fam.state, **form.kwargs)
                s = sum(lens[:i])
                if n:
                    assert_close(f"o of sequence {i}", o[:, s:s + n], oi, R.torch_dtype(dtype),
                                 record=_keeper(form, prop))
                if ht is not None:
                    assert_close(f"final state of sequence {i}", ht[i:i + 1], hti, R.torch_dtype(dtype),
                                 record=_keeper(form, prop))

    check()


@pytest.mark.parametrize("form,dtype", _cases())
def test_state_splits_at_any_t(form, dtype):
    """Running tokens [0, t) with output_final_state, then [t, T) from that final state, gives the output and
    final state of one run over [0, T), for any split t, to the dtype's forward bound."""
    prop = "state_splits_at_any_t"
    fn = _load(form, prop, dtype)
    fam = R.FAMILIES[form.family]
    if not (fam.state and form.final_state):
        unsupported(form, prop, "no final state to carry (stateless form)")

    @settings(max_examples=EXAMPLES)
    @given(T=st.integers(2, MAX_T), split=st.floats(0.0, 1.0), H=st.integers(1, 2), K=st.sampled_from(HEAD_SIZES),
           V=st.sampled_from(HEAD_SIZES), initial_state=st.booleans(), seed=st.integers(0, 2 ** 20))
    def check(T, split, H, K, V, initial_state, seed):
        t = min(T - 1, max(1, round(split * T)))
        x = _inputs(form, 1, T, H, K, V, dtype, seed, initial_state)
        head = {k: (v if k == "initial_state" else v[:, :t]) for k, v in x.items()}
        with torch.no_grad():
            o, ht = form.call(fn, x, True, **form.kwargs)
            o1, h1 = form.call(fn, head, True, **form.kwargs)
            tail = {k: v[:, t:] for k, v in x.items() if k != "initial_state"}
            tail["initial_state"] = h1
            o2, h2 = form.call(fn, tail, True, **form.kwargs)
        dt = R.torch_dtype(dtype)
        assert_close("o over [0, T) vs split", torch.cat([o1, o2], 1), o, dt, record=_keeper(form, prop))
        assert_close("final state vs split", h2, ht, dt, record=_keeper(form, prop))

    check()


@pytest.mark.parametrize("form,dtype", _cases())
def test_nan_in_gives_nan_out(form, dtype):
    """A NaN in one value row (t = 80 of 100) reaches the output without a crash: o has a NaN from that token on,
    and the tokens of earlier blocks stay finite. (Chunked and blocked forms multiply whole blocks, where
    0 * NaN = NaN spreads the NaN to the earlier tokens of its own block: BLOCK = 64 covers every form here.)"""
    prop = "nan_in_gives_nan_out"
    fn = _load(form, prop, dtype)
    fam = R.FAMILIES[form.family]
    x = _inputs(form, 1, 100, 1, HEAD_SIZES[0], HEAD_SIZES[0], dtype, 7, False)
    x["v"] = x["v"].clone()
    x["v"][0, NAN_AT] = float("nan")
    with torch.no_grad():
        o, _ = form.call(fn, x, form.final_state and fam.state, **form.kwargs)
    nan_after = bool(torch.isnan(o[0, NAN_AT:]).all(-1).any())
    finite_before = bool(torch.isfinite(o[0, :BLOCK]).all())
    ok = nan_after and finite_before
    keep("NaN reaches o, earlier blocks finite", 0.0 if ok else 1.0, 0.0, impl=form.name, prop=prop,
         status="pass" if ok else "fail", dtype=dtype)
    assert nan_after, f"{form.name}: a NaN in v at t = {NAN_AT} did not reach o"
    assert finite_before, f"{form.name}: a NaN in v at t = {NAN_AT} reached o before t = {BLOCK}"
