"""The generalized delta rule (IPLR, DPLR) and DeltaFormer references: forms agree, and the family reduces to its
special cases."""
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import reference as R
from properties.strategies import delta_cases, log_decay, low_rank
from properties.tolerances import REFERENCE_AGREEMENT, rel_err

cases = delta_cases(dtypes=[torch.float64], max_T=40, head_sizes=[1, 3, 8])


def common(x):
    return dict(scale=x["scale"], initial_state=x["initial_state"], output_final_state=True,
                cu_seqlens=x["cu_seqlens"])


@given(cases, st.booleans())
def test_iplr_recurrence_equals_transition_product(case, raw):
    """IPLR token by token equals S_r = P_r S_0 + H_r from dense products of G_t = I + b_t a_t^T."""
    x = case.make("cpu")
    a, b = low_rank(case, "raw" if raw else "stable")
    o1, s1 = R.iplr_recurrent(x["q"], x["k"], x["v"], a, b, **common(x))
    o2, s2 = R.iplr_transition_product(x["q"], x["k"], x["v"], a, b, **common(x))
    assert rel_err(o1, o2) < REFERENCE_AGREEMENT and rel_err(s1, s2) < REFERENCE_AGREEMENT


@given(cases, st.booleans())
def test_dplr_recurrence_equals_transition_product(case, raw):
    """DPLR token by token equals the dense product of G_t = diag(exp(gk_t)) + b_t a_t^T."""
    x = case.make("cpu")
    a, b = low_rank(case, "raw" if raw else "stable")
    gk = log_decay(case, -5.0)
    o1, s1 = R.dplr_recurrent(x["q"], x["k"], x["v"], a, b, gk, **common(x))
    o2, s2 = R.dplr_transition_product(x["q"], x["k"], x["v"], a, b, gk, **common(x))
    assert rel_err(o1, o2) < REFERENCE_AGREEMENT and rel_err(s1, s2) < REFERENCE_AGREEMENT


@given(cases)
def test_iplr_with_a_minus_beta_k_b_k_is_the_delta_rule(case):
    """IPLR with a = -beta k, b = k and v -> beta v is the delta rule."""
    x = case.make("cpu")
    beta = x["beta"][..., None]
    o1, s1 = R.iplr_recurrent(x["q"], x["k"], beta * x["v"], -beta * x["k"], x["k"], **common(x))
    o2, s2 = R.delta_rule_recurrent(x["q"], x["k"], x["v"], x["beta"], **common(x))
    assert rel_err(o1, o2) < REFERENCE_AGREEMENT and rel_err(s1, s2) < REFERENCE_AGREEMENT


@given(cases, st.booleans())
def test_dplr_with_zero_decay_is_iplr(case, raw):
    """DPLR with gk = 0 (no decay) is IPLR."""
    x = case.make("cpu")
    a, b = low_rank(case, "raw" if raw else "stable")
    o1, s1 = R.dplr_recurrent(x["q"], x["k"], x["v"], a, b, torch.zeros_like(a), **common(x))
    o2, s2 = R.iplr_recurrent(x["q"], x["k"], x["v"], a, b, **common(x))
    assert rel_err(o1, o2) < REFERENCE_AGREEMENT and rel_err(s1, s2) < REFERENCE_AGREEMENT


@given(delta_cases(dtypes=[torch.float64], max_T=40, head_sizes=[2, 5], varlen=False), st.data())
def test_dplr_state_splits_at_any_t(case, data):
    """DPLR over [0, t) then [t, T) from the carried state equals one run, strong decay (gk down to -20) included."""
    x = case.make("cpu")
    a, b = low_rank(case, "stable")
    gk = log_decay(case, -20.0)
    t = data.draw(st.integers(0, case.T))
    o, s = R.dplr_recurrent(x["q"], x["k"], x["v"], a, b, gk, **common(x))
    cut = lambda z, sl: z[:, sl]  # noqa: E731
    o1, s1 = R.dplr_recurrent(*(cut(z, slice(0, t)) for z in (x["q"], x["k"], x["v"], a, b, gk)), **common(x))
    o2, s2 = R.dplr_recurrent(*(cut(z, slice(t, None)) for z in (x["q"], x["k"], x["v"], a, b, gk)),
                              **dict(common(x), initial_state=s1))
    assert rel_err(torch.cat([o1, o2], 1), o) < REFERENCE_AGREEMENT and rel_err(s2, s) < REFERENCE_AGREEMENT
    assert torch.isfinite(o).all()


@given(cases)
def test_deltaformer_recurrence_equals_triangular_solve(case):
    """u from its token-by-token definition equals the solve (I + diag(beta) P) u = v; so do the outputs."""
    x = case.make("cpu")
    o1 = R.deltaformer_recurrent(x["q"], x["k"], x["v"], x["beta"], x["scale"], x["cu_seqlens"])
    o2 = R.deltaformer_solve(x["q"], x["k"], x["v"], x["beta"], x["scale"], x["cu_seqlens"])
    assert rel_err(o1, o2) < REFERENCE_AGREEMENT


@given(delta_cases(dtypes=[torch.float64], max_T=40, head_sizes=[1, 3, 8], varlen=False))
def test_deltaformer_with_beta_zero_is_causal_softmax_attention(case):
    """beta = 0 erases nothing: DeltaFormer is causal softmax attention (checked against torch's SDPA too)."""
    x = case.make("cpu")
    K = case.K
    scale = x["scale"] if x["scale"] is not None else K ** -0.5
    o = R.deltaformer_recurrent(x["q"], x["k"], x["v"], torch.zeros_like(x["beta"]), x["scale"])
    t = lambda z: z.transpose(1, 2)  # noqa: E731
    sdpa = t(F.scaled_dot_product_attention(t(x["q"]), t(x["k"]), t(x["v"]), is_causal=True, scale=scale))
    assert rel_err(o, sdpa) < REFERENCE_AGREEMENT
    assert rel_err(R.causal_softmax_attention(x["q"], x["k"], x["v"], x["scale"]), sdpa) < REFERENCE_AGREEMENT
