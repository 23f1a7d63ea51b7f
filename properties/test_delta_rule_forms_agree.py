"""The three Triton forms of the delta rule hold the rule's algebra on their own: they agree with each other,
a state carried across a split equals one run, and a packed batch equals its segments run alone."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ops
from properties.strategies import OP_DTYPES, delta_cases
from properties.tolerances import bound, rel_err

CPU_SMALL = dict(head_sizes=[3, 16, 24]) if not torch.cuda.is_available() else {}


def agree(name, a, b, dtype, record=None):
    """Two low-precision results of one function: each is within bound(dtype) of the truth, so they agree
    within twice it."""
    err, two = rel_err(a, b), 2 * bound(dtype)
    if record is not None:
        record(f"forms.{name}", err, two, dtype=dtype)
    assert err <= two, f"{name}: {err:.3e} > {two:.3e} ({dtype})"


def tokens(x, sl):
    """The inputs with the per-token tensors (q, k, v, beta) cut to the time steps `sl`."""
    return {n: (x[n][:, sl] if n in ("q", "k", "v", "beta") else x[n]) for n in x}


def chunk(x, **kw):
    return ops.chunk_delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=x["scale"],
                                initial_state=x["initial_state"], output_final_state=True,
                                cu_seqlens=x["cu_seqlens"], **kw)


def recurrent(x):
    return ops.fused_recurrent_delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=x["scale"],
                                          initial_state=x["initial_state"], output_final_state=True,
                                          cu_seqlens=x["cu_seqlens"])


def parallel(x):
    return ops.parallel_delta_rule(x["q"], x["k"], x["v"], x["beta"], scale=x["scale"],
                                   initial_state=x["initial_state"], cu_seqlens=x["cu_seqlens"])[0]


@given(case=delta_cases(**CPU_SMALL), chunk_size=st.sampled_from([16, 32, 64]))
def test_chunk_equals_recurrent_equals_parallel(case, chunk_size, record):
    """chunk == fused recurrent == parallel on the same inputs (o and final state)."""
    x = case.make()
    o_c, s_c = chunk(x, chunk_size=chunk_size)
    o_r, s_r = recurrent(x)
    o_p = parallel(x)
    for name, a, b in [("o chunk~recurrent", o_c, o_r), ("o chunk~parallel", o_c, o_p),
                       ("state chunk~recurrent", s_c, s_r)]:
        agree(name, a, b, case.dtype, record)


@given(case=delta_cases(varlen=False, **CPU_SMALL), data=st.data())
def test_chunk_state_splits_at_any_t(case, data):
    """chunk over [0, t) then [t, T) from its own final state equals one chunk run (o and final state)."""
    x = case.make()
    t = data.draw(st.integers(0, case.T))
    o, s = chunk(x, chunk_size=16)
    o1, s1 = chunk(tokens(x, slice(0, t)), chunk_size=16)
    o2, s2 = chunk(dict(tokens(x, slice(t, None)), initial_state=s1), chunk_size=16)
    agree("split.o", torch.cat([o1, o2], 1), o, case.dtype)
    agree("split.state", s2, s, case.dtype)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@given(case=delta_cases(varlen=True, **CPU_SMALL))
def test_varlen_equals_each_segment_alone(form, case):
    """A packed batch through the chunk or the fused recurrent form equals each segment run alone (o and final
    states)."""
    run = {"chunk": lambda x: chunk(x, chunk_size=16), "recurrent": recurrent}[form]
    x = case.make()
    o, s = run(x)
    cu = x["cu_seqlens"].tolist()
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        S0 = None if x["initial_state"] is None else x["initial_state"][n:n + 1]
        on, sn = run(dict(tokens(x, slice(a, b)), cu_seqlens=None, initial_state=S0))
        agree("varlen.o", o[:, a:b], on, case.dtype)
        agree("varlen.state", s[n:n + 1], sn, case.dtype)


def test_fused_chunk_is_an_alias_of_chunk():
    """fused_chunk_delta_rule is chunk_delta_rule, as in fla."""
    assert ops.fused_chunk_delta_rule is ops.chunk_delta_rule


def test_op_dtypes_cover_the_required_set():
    """The suite tests fp16, fp32, fp64 everywhere and bf16 wherever a GPU is present."""
    required = {torch.float16, torch.float32, torch.float64}
    if torch.cuda.is_available():
        required.add(torch.bfloat16)
    assert required <= set(OP_DTYPES)
