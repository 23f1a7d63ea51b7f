"""The generalized delta rule ops agree with each other and reduce to their special cases: chunk == fused recurrent,
DPLR with gk = 0 == IPLR, and IPLR with a = -beta k, b = k, v -> beta v == the delta rule op."""
import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ops.generalized_delta_rule import (
    chunk_dplr_delta_rule,
    chunk_iplr_delta_rule,
    fused_recurrent_dplr_delta_rule,
    fused_recurrent_iplr_delta_rule,
)
from properties.generalized_support import CHUNK_SIZES, chunk_op, edge_examples, inputs, leaves, nonempty, upstream
from properties.strategies import delta_cases
from properties.tolerances import assert_close

MAX_T = 40


def run(op, ours, x):
    """op's (o, final state) and the gradients of all leaves for the case's fixed random upstream gradients."""
    o, ht = op(**ours, scale=x["scale"], output_final_state=True, cu_seqlens=x["cu_seqlens"])
    outs, grads_out = upstream(o, ht, 0)
    return (o, ht), dict(zip(ours, torch.autograd.grad(outs, list(ours.values()), grads_out)))


def check_agree(a, b, dtype, record, names=None):
    (o1, h1), g1 = a
    (o2, h2), g2 = b
    assert_close("o", o1, o2, dtype, "forward", record=record)
    assert_close("final_state", h1, h2, dtype, "forward", record=record)
    for name in names or g2:
        assert_close(f"d{name}", g1[name], g2[name], dtype, "gradient", record=record)


@given(case=delta_cases(dtypes=[torch.float64], max_T=MAX_T), decay=st.sampled_from([None, -5.0, -20.0]),
       chunk_size=st.sampled_from(CHUNK_SIZES))
@edge_examples(decay=-20.0, chunk_size=16)
def test_chunk_equals_fused_recurrent(case, decay, chunk_size, record):
    """In float64 the chunk and fused recurrent forms (IPLR without decay, DPLR with mild or strong decay) give
    the same o, final state and gradients for every input, to the float64 bounds."""
    case = nonempty(case)
    case = dataclasses.replace(case, dtype=torch.float64)  # (the edge examples come in other dtypes)
    x = inputs(case, decay=decay, ends=decay == -20.0)
    if decay is None:
        chunk, recurrent = chunk_op(chunk_size, chunk_iplr_delta_rule), fused_recurrent_iplr_delta_rule
    else:
        chunk, recurrent = chunk_op(chunk_size, chunk_dplr_delta_rule), fused_recurrent_dplr_delta_rule
    ours, _ = leaves(x)
    ours2, _ = leaves(x)
    check_agree(run(chunk, ours, x), run(recurrent, ours2, x), case.dtype, record)


@given(case=delta_cases(max_T=MAX_T), form=st.sampled_from(["chunk", "fused_recurrent"]),
       family=st.sampled_from(["stable", "raw"]))
@edge_examples(form="chunk", family="stable")
def test_dplr_with_zero_decay_is_iplr(case, form, family, record):
    """The DPLR op with gk = 0 (no decay) gives the IPLR op's o, final state and q, k, v, a, b, initial_state
    gradients, to the dtype's bounds."""
    case = nonempty(case)
    if family == "raw" and case.T > 24:
        family = "stable"
    x = inputs(case, family)
    dplr = {"chunk": chunk_dplr_delta_rule, "fused_recurrent": fused_recurrent_dplr_delta_rule}[form]
    iplr = {"chunk": chunk_iplr_delta_rule, "fused_recurrent": fused_recurrent_iplr_delta_rule}[form]
    ours, _ = leaves(x)
    ours2, _ = leaves(x)
    gk = torch.zeros_like(x["q"])
    check_agree(run(lambda **kw: dplr(gk=gk, **kw), ours, x), run(iplr, ours2, x), case.dtype, record)


@given(case=delta_cases(max_T=MAX_T), form=st.sampled_from(["chunk", "fused_recurrent"]))
@edge_examples(form="fused_recurrent")
def test_iplr_with_erase_write_is_the_delta_rule(case, form, record):
    """IPLR with a = -beta k, b = k and values beta v is the delta rule: o, final state and the q, k, v, beta,
    initial_state gradients (through that substitution) equal ops.delta_rule's fused recurrent op's, to the
    dtype's bounds."""
    delta = pytest.importorskip("ops.delta_rule.fused_recurrent").fused_recurrent_delta_rule
    case = nonempty(case)
    x = case.make()
    names = [n for n in ("q", "k", "v", "beta", "initial_state") if x.get(n) is not None]
    ours = {n: x[n].detach().clone().requires_grad_() for n in names}
    theirs = {n: x[n].detach().clone().requires_grad_() for n in names}
    iplr = {"chunk": chunk_iplr_delta_rule, "fused_recurrent": fused_recurrent_iplr_delta_rule}[form]

    def substituted(q, k, v, beta, **kw):
        beta = beta[..., None]
        return iplr(q=q, k=k, v=beta * v, a=-beta * k, b=k, **kw)

    check_agree(run(substituted, ours, x), run(delta, theirs, x), case.dtype, record)
