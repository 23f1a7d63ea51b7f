"""Properties of the token-by-token delta rule (ops.delta_rule.fused_recurrent) against the float64 reference."""
import contextlib
import dataclasses
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ops.common.utils as utils
import ops.delta_rule.fused_recurrent as fr
import reference
from ops.delta_rule.fused_recurrent import fused_recurrent_delta_rule
from properties.strategies import (
    DEVICE,
    OP_DTYPES,
    bad_input_maker,
    common_bad_inputs,
    delta_cases,
    fixed_case,
    with_examples,
)
from properties.tolerances import assert_close

GRAD_NAMES = ("q", "k", "v", "beta", "initial_state")




# Edge cases every run sees: one token and head size 1; packed empty and length-1 segments; K != V, odd sizes.
EDGE_CASES = [
    fixed_case(),
    fixed_case(K=3, V=1, dtype=torch.float64, seqlens=(0, 1, 5, 0)),
    fixed_case(B=2, T=9, H=2, K=24, V=3, dtype=torch.float16, unit_keys=False, beta_max=1.0, initial_state=False),
    fixed_case(seqlens=(0, 0), K=8, V=8),
]




@contextlib.contextmanager
def _backward(mode):
    """Run the op's backward as `mode` (fused_recurrent.BACKWARDS)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fr, "BACKWARD", mode)
        yield


@contextlib.contextmanager
def _split_v(enabled):
    """Shrink the state-tile budgets so V spans several programs (the partial-sum path), which the small
    interpreter head sizes would otherwise never reach."""
    with pytest.MonkeyPatch.context() as mp:
        if enabled:
            mp.setattr(fr, "FWD_TILE", 128)
            mp.setattr(fr, "BWD_TILE", 128)
        yield


def _run(case, *, output_final_state=True, l2norm=False, split_v=False):
    """Our op and the float64 reference on the same (rounded) inputs; leaves for both, for gradients."""
    inp = case.make()
    names = [n for n in GRAD_NAMES if inp.get(n) is not None]
    ours = {n: inp[n].detach().clone().requires_grad_() for n in names}
    refs = {n: inp[n].detach().double().requires_grad_() for n in names}
    kw = dict(scale=inp["scale"], output_final_state=output_final_state, cu_seqlens=inp["cu_seqlens"])
    with _split_v(split_v):
        o, ht = fused_recurrent_delta_rule(**ours, use_qk_l2norm_in_kernel=l2norm, **kw)
    rin = dict(refs)
    if l2norm:
        rin["q"], rin["k"] = reference.l2norm(rin["q"]), reference.l2norm(rin["k"])
    ro, rht = reference.delta_rule_recurrent(**rin, **kw)
    return ours, refs, (o, ht), (ro, rht)


def _check_gradients(case, ours, refs, outs, routs, record, split_v=False):
    (o, ht), (ro, rht) = outs, routs
    g = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
    dht = torch.randn(ht.shape, generator=g, dtype=torch.float64).to(device=ht.device, dtype=ht.dtype)
    with _split_v(split_v):
        grads = torch.autograd.grad((o, ht), list(ours.values()), (do, dht))
    rgrads = torch.autograd.grad((ro, rht), list(refs.values()), (do.double(), dht.double()),
                                 allow_unused=True, materialize_grads=True)
    for name, x, gx, rgx in zip(ours, ours.values(), grads, rgrads):
        assert gx.dtype == x.dtype and gx.shape == x.shape, name
        assert_close(f"d{name}", gx, rgx, case.dtype, "gradient", record=record)


@given(case=delta_cases(), output_final_state=st.booleans())
@with_examples(EDGE_CASES, output_final_state=True)
def test_fused_recurrent_matches_reference(case, output_final_state, record):
    """o and the final state equal the float64 token-by-token reference within the dtype's forward bound;
    o comes back in the input dtype, the final state in float32 (float64 for float64 inputs), or None."""
    _, _, (o, ht), (ro, rht) = _run(case, output_final_state=output_final_state)
    assert o.dtype == case.dtype and o.shape == ro.shape
    assert_close("o", o, ro, case.dtype, "forward", record=record)
    if not output_final_state:
        assert ht is None
        return
    assert ht.dtype == utils.acc_dtype(case.dtype)
    assert_close("final_state", ht, rht, case.dtype, "forward", record=record)


@given(case=delta_cases(), split_v=st.booleans(), backward=st.sampled_from(fr.BACKWARDS))
@with_examples(EDGE_CASES, split_v=True, backward="recurrent")
@with_examples(EDGE_CASES, split_v=False, backward="chunk")
@example(case=fixed_case(B=2, T=6, H=2, K=8, V=24, initial_state=True), split_v=True, backward="recurrent")
@example(case=fixed_case(B=1, T=150, H=2, K=20, V=24, seqlens=(0, 70, 1, 79)), split_v=False, backward="chunk")
def test_fused_recurrent_gradients_match_reference(case, split_v, backward, record):
    """With random upstream gradients for o and the final state, the backward's gradients for q, k, v, beta and
    initial_state equal the reference's autograd gradients within the gradient bound: the token-by-token backward
    (also when V is split over several programs, whose partial dq, dk, dbeta are summed) and the chunkwise one
    (several chunks, packed sequences)."""
    if case.T == 0:
        # (the empty-input gradients are checked in test_fused_recurrent_empty_input)
        case = dataclasses.replace(case, T=3, seqlens=(1, 0, 2))
    with _backward(backward):
        ours, refs, outs, routs = _run(case, split_v=split_v)
        assert_close("o", outs[0], routs[0], case.dtype, "forward", record=record)
        _check_gradients(case, ours, refs, outs, routs, record, split_v=split_v)


@given(case=delta_cases())
@example(case=fixed_case(K=3, V=5, seqlens=(2, 0, 1)))
def test_fused_recurrent_l2norm_in_kernel_matches_reference(case, record):
    """use_qk_l2norm_in_kernel=True equals the reference on reference.l2norm(q), reference.l2norm(k), values and
    gradients (the gradients flow through the normalization back to the raw q and k)."""
    pytest.importorskip("ops.common.l2norm")
    if case.T == 0:
        case = dataclasses.replace(case, T=2, seqlens=(2,))
    if case.K == 1:  # l2norm of one number is +-1: its gradient is eps-sized (fp16-subnormal), not a relative test
        case = dataclasses.replace(case, K=3)
    ours, refs, outs, routs = _run(case, l2norm=True)
    assert_close("o", outs[0], routs[0], case.dtype, "forward", record=record)
    assert_close("final_state", outs[1], routs[1], case.dtype, "forward", record=record)
    _check_gradients(case, ours, refs, outs, routs, record)


@pytest.mark.parametrize("backward", fr.BACKWARDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_fused_recurrent_gradcheck(varlen, backward, monkeypatch):
    """float64 torch.autograd.gradcheck of each Triton backward: q, k, v, beta, initial_state through o and the
    final state, on tiny shapes (one packed layout has an empty and a length-1 segment)."""
    monkeypatch.setattr(fr, "BACKWARD", backward)
    g = torch.Generator().manual_seed(7)
    if varlen:
        B, T, N, cu = 1, 5, 3, torch.tensor([0, 3, 3, 5], device=DEVICE)
    else:
        B, T, N, cu = 2, 4, 2, None
    H, K, V = 1, 3, 4
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    k = torch.nn.functional.normalize(rnd(B, T, H, K), dim=-1)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64).to(DEVICE) * 1.5
    args = [x.requires_grad_() for x in (rnd(B, T, H, K), k, rnd(B, T, H, V), beta, rnd(N, H, K, V))]

    def f(q, k, v, beta, h0):
        return fused_recurrent_delta_rule(q, k, v, beta, scale=0.8, initial_state=h0, output_final_state=True,
                                          cu_seqlens=cu)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_fused_recurrent_decode_carries_state(dtype, monkeypatch, record):
    """Decoding one token at a time (T = 1, B = 3) and carrying the final state into the next call reproduces
    the reference on the whole sequence, with NaN-poisoned output buffers (so every element is written)."""
    monkeypatch.setattr(utils, "POISON_OUTPUTS", True)
    B, T, H, K, V = 3, 4, 2, 8, 5
    case = fixed_case(B=B, T=T, H=H, K=K, V=V, dtype=dtype, seed=11)
    inp = case.make()
    ro, rht = reference.delta_rule_recurrent(inp["q"], inp["k"], inp["v"], inp["beta"],
                                             initial_state=inp["initial_state"], output_final_state=True)
    state, outs = inp["initial_state"], []
    for t in range(T):
        step = [inp[n][:, t:t + 1] for n in ("q", "k", "v", "beta")]
        o, state = fused_recurrent_delta_rule(*step, initial_state=state, output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(state).all()
        outs.append(o)
    assert_close("o", torch.cat(outs, 1), ro, dtype, "forward", record=record)
    assert_close("final_state", state, rht, dtype, "forward", record=record)


@pytest.mark.parametrize("dtype", OP_DTYPES)
def test_fused_recurrent_nan_in_q_gives_nan_in_o(dtype):
    """A NaN in q makes the o row it feeds NaN (no crash), and leaves every other output finite."""
    case = fixed_case(B=2, T=3, H=2, K=8, V=4, dtype=dtype, seed=3)
    inp = case.make()
    q = inp["q"].clone()
    q[1, 2, 0, 5] = math.nan
    o, ht = fused_recurrent_delta_rule(q, inp["k"], inp["v"], inp["beta"], initial_state=inp["initial_state"],
                                       output_final_state=True)
    bad = torch.zeros(o.shape, dtype=torch.bool, device=o.device)
    bad[1, 2, 0] = True
    assert torch.isnan(o[bad]).all()
    assert torch.isfinite(o[~bad]).all() and torch.isfinite(ht).all()


@pytest.mark.parametrize("backward", fr.BACKWARDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_fused_recurrent_empty_input(varlen, backward, monkeypatch):
    """T = 0 (or only empty segments): o is empty, the final state is the initial state (zeros without one),
    and the initial state's gradient is the final state's upstream gradient (with either backward)."""
    monkeypatch.setattr(fr, "BACKWARD", backward)
    H, K, V = 2, 3, 5
    B, N, cu = (1, 3, torch.zeros(4, dtype=torch.long, device=DEVICE)) if varlen else (2, 2, None)
    q = torch.randn(B, 0, H, K, device=DEVICE, requires_grad=True)
    v = torch.randn(B, 0, H, V, device=DEVICE, requires_grad=True)
    beta = torch.rand(B, 0, H, device=DEVICE, requires_grad=True)
    h0 = torch.randn(N, H, K, V, device=DEVICE, requires_grad=True)
    o, ht = fused_recurrent_delta_rule(q, q, v, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (B, 0, H, V)
    assert torch.equal(ht, h0)
    dht = torch.randn_like(ht)
    dq, dv, dbeta, dh0 = torch.autograd.grad((o, ht), (q, v, beta, h0), (torch.zeros_like(o), dht))
    assert torch.equal(dh0, dht) and dq.shape == q.shape and dv.shape == v.shape and dbeta.shape == beta.shape
    _, ht = fused_recurrent_delta_rule(q, q, v, beta, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(ht, torch.zeros(N, H, K, V, device=DEVICE))


_bad = bad_input_maker(beta=lambda B, T, H, K: torch.rand(B, T, H))


@pytest.mark.parametrize("kwargs, match", [
    (_bad(beta=torch.rand(1, 6)), "beta"),
    (_bad(beta=torch.rand(1, 6, 3)), "beta"),
    (_bad(beta=torch.ones(1, 6, 2, dtype=torch.long)), "beta"),
    (_bad(cu_seqlens=torch.tensor([0, 3, 5])), "cu_seqlens"),
    *common_bad_inputs(_bad),
    (_bad(k=torch.randn(1, 6, 2, 5)), "k"),
])
def test_fused_recurrent_rejects_bad_input(kwargs, match):
    """Malformed input raises a ValueError or TypeError that names the offending argument."""
    with pytest.raises((ValueError, TypeError), match=match):
        fused_recurrent_delta_rule(**kwargs)
