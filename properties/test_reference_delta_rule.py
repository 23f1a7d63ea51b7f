"""The float64 delta-rule references held against each other and against the rule's algebra.

S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale S_t^T q_t."""
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import reference as R
from properties.strategies import Case, delta_cases
from properties.tolerances import REFERENCE_AGREEMENT, rel_err

f64_cases = delta_cases(dtypes=[torch.float64], max_T=48, head_sizes=[1, 3, 8, 13], max_H=2)
EDGE = Case(B=1, T=5, H=1, K=3, V=2, dtype=torch.float64, seed=0, unit_keys=True, beta_max=2.0, beta_ends=True,
            initial_state=True, seqlens=(0, 1, 4), scale=None)


def run(form, x, **kw):
    return form(x["q"], x["k"], x["v"], x["beta"], scale=x["scale"], initial_state=x["initial_state"],
                output_final_state=True, cu_seqlens=x["cu_seqlens"], **kw)[:2]


@given(f64_cases, st.sampled_from([1, 2, 5, 16, 64]))
@example(EDGE, 2)
def test_four_references_agree(case, chunk_size):
    """Recurrence, Householder products, chunkwise WY/UT (any chunk size) and the parallel form agree to 1e-12."""
    x = case.make("cpu")
    o0, s0 = run(R.delta_rule_recurrent, x)
    for form, kw in [(R.delta_rule_householder, {}), (R.delta_rule_chunkwise, dict(chunk_size=chunk_size)),
                     (R.delta_rule_parallel, {})]:
        o, s = run(form, x, **kw)
        assert rel_err(o, o0) < REFERENCE_AGREEMENT, form.__name__
        assert rel_err(s, s0) < REFERENCE_AGREEMENT, form.__name__


@given(delta_cases(dtypes=[torch.float64], max_T=40, head_sizes=[2, 5], varlen=False), st.data())
def test_parallel_attention_matrix_gives_output(case, data):
    """With S0 = 0 the parallel form's T x T matrix A reproduces o = A v, and A is lower triangular."""
    x = case.make("cpu")
    o, _, attn = R.delta_rule_parallel(x["q"], x["k"], x["v"], x["beta"], scale=x["scale"])
    for b, A in enumerate(attn):
        assert torch.equal(A, torch.tril(A))
        assert rel_err(A @ x["v"][b].transpose(0, 1), o[b].transpose(0, 1)) < REFERENCE_AGREEMENT


@given(delta_cases(dtypes=[torch.float64], max_T=40, head_sizes=[2, 5], varlen=False), st.data())
def test_state_splits_at_any_t(case, data):
    """Running [0, t) and then [t, T) from the carried state equals one run over [0, T)."""
    x = case.make("cpu")
    t = data.draw(st.integers(0, case.T))
    o, s = run(R.delta_rule_recurrent, x)
    first = dict(x, q=x["q"][:, :t], k=x["k"][:, :t], v=x["v"][:, :t], beta=x["beta"][:, :t])
    o1, s1 = run(R.delta_rule_recurrent, first)
    second = dict(x, q=x["q"][:, t:], k=x["k"][:, t:], v=x["v"][:, t:], beta=x["beta"][:, t:], initial_state=s1)
    o2, s2 = run(R.delta_rule_recurrent, second)
    assert rel_err(torch.cat([o1, o2], 1), o) < REFERENCE_AGREEMENT
    assert rel_err(s2, s) < REFERENCE_AGREEMENT


@given(delta_cases(dtypes=[torch.float64], max_T=60, head_sizes=[2, 5], varlen=True))
@example(EDGE)
def test_varlen_equals_each_segment_alone(case):
    """A packed batch (cu_seqlens) equals running every segment alone from its own initial state."""
    x = case.make("cpu")
    o, s = run(R.delta_rule_chunkwise, x, chunk_size=4)
    cu = x["cu_seqlens"].tolist()
    for n, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        S0 = None if x["initial_state"] is None else x["initial_state"][n:n + 1]
        seg = dict(x, q=x["q"][:, a:b], k=x["k"][:, a:b], v=x["v"][:, a:b], beta=x["beta"][:, a:b],
                   initial_state=S0, cu_seqlens=None)
        on, sn = run(R.delta_rule_recurrent, seg)
        assert rel_err(o[:, a:b], on) < REFERENCE_AGREEMENT
        assert rel_err(s[n:n + 1], sn) < REFERENCE_AGREEMENT


@given(delta_cases(dtypes=[torch.float64], max_T=30, head_sizes=[3], varlen=False))
def test_beta_zero_leaves_state_unchanged(case):
    """beta = 0 writes and erases nothing: the final state is S0 and o_t = scale S0^T q_t."""
    x = case.make("cpu")
    x["beta"] = torch.zeros_like(x["beta"])
    S0 = x["initial_state"] if x["initial_state"] is not None else torch.zeros(case.B, case.H, case.K, case.V,
                                                                             dtype=torch.float64)
    o, s = run(R.delta_rule_householder, x)
    scale = x["scale"] if x["scale"] is not None else case.K ** -0.5
    assert torch.allclose(s, S0, atol=0, rtol=1e-14)
    assert rel_err(o, scale * torch.einsum("bhkv,bthk->bthv", S0, x["q"])) < REFERENCE_AGREEMENT


@given(st.integers(1, 12), st.integers(0, 4), st.integers(1, 6), st.integers(0, 2**31))
def test_orthonormal_keys_with_beta_one_retrieve_exactly(T, extra, V, seed):
    """With orthonormal keys and beta = 1 every write is exact: querying with key k_j (scale 1) returns v_j."""
    K = T + extra
    g = torch.Generator().manual_seed(seed)
    Qm, _ = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    k = Qm[:T].reshape(1, T, 1, K)
    v = torch.randn(1, T, 1, V, generator=g, dtype=torch.float64)
    _, S = R.delta_rule_recurrent(k, k, v, torch.ones(1, T, 1, dtype=torch.float64), output_final_state=True)
    retrieved = torch.einsum("hkv,thk->thv", S[0], k[0])
    assert rel_err(retrieved, v[0]) < REFERENCE_AGREEMENT


@given(st.integers(1, 16), st.floats(0.0, 2.0), st.integers(0, 2**31))
@example(4, 0.0, 0)
@example(4, 2.0, 0)
def test_unit_key_transitions_are_contractions(K, beta, seed):
    """For |k| = 1 and beta in [0, 2], I - beta k k^T has spectral norm <= 1 (eigenvalues 1 and 1 - beta)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.nn.functional.normalize(torch.randn(K, generator=g, dtype=torch.float64), dim=0)
    G = torch.eye(K, dtype=torch.float64) - beta * torch.outer(k, k)
    assert torch.linalg.matrix_norm(G, ord=2) <= 1 + 1e-12
