"""Properties of the IPLR delta rule ops (ops.generalized_delta_rule: chunk and fused recurrent) against the float64
token-by-token reference: S_t = (I + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t."""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import ops.generalized_delta_rule.dplr.fused_recurrent as fused_recurrent
import reference
from ops.generalized_delta_rule import chunk_iplr_delta_rule, fused_recurrent_iplr_delta_rule
from properties.generalized_support import (
    BAD_INPUTS,
    CHUNK_SIZES,
    EDGE_CASES,
    RAW_MAX_T,
    bad,
    check_op,
    chunk_op,
    edge_examples,
    gradcheck_fast,
    gradcheck_inputs,
    inputs,
    nonempty,
    small_tiles,
    with_fields,
)
from properties.strategies import DEVICE, OP_DTYPES, delta_cases, fixed_case


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
    case = fixed_case(K=5, V=3, H=2, dtype=torch.float64, seqlens=(9, 0, 1, 4, 13), seed=5)
    check_op(fused_recurrent_iplr_delta_rule, reference.iplr_recurrent, inputs(case), case.dtype, record)


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
    case = fixed_case(B=2, T=3, H=2, K=8, V=4, dtype=dtype, seed=3)
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
