"""torch.autograd.gradcheck of every float64 reference, through every input: q, k, v, beta, a, b, gk and the
initial state, with the final state as an output, on plain and packed (varlen) batches."""
import pytest
import torch

import reference as R

g = torch.Generator().manual_seed(0)


def t(*shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


B, T, H, K, V = 1, 5, 2, 3, 2
CU = torch.tensor([0, 0, 1, 5])


def qkv():
    return t(B, T, H, K), torch.nn.functional.normalize(t(B, T, H, K), dim=-1).detach().requires_grad_(), t(B, T, H, V)


DELTA_FORMS = [R.delta_rule_recurrent, R.delta_rule_householder,
               lambda *a, **kw: R.delta_rule_chunkwise(*a, chunk_size=2, **kw),
               lambda *a, **kw: R.delta_rule_parallel(*a, **kw)[:2]]


@pytest.mark.parametrize("form", DELTA_FORMS, ids=["recurrent", "householder", "chunkwise", "parallel"])
@pytest.mark.parametrize("varlen", [False, True])
def test_delta_rule_reference_gradcheck(form, varlen):
    """Gradients of o and the final state w.r.t. q, k, v, beta and initial_state match finite differences."""
    cu = CU if varlen else None
    q, k, v = qkv()
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64).requires_grad_()
    S0 = t(len(CU) - 1 if varlen else B, H, K, V)
    f = lambda q, k, v, beta, S0: form(q, k, v, beta, initial_state=S0, output_final_state=True,  # noqa: E731
                                       cu_seqlens=cu)
    assert torch.autograd.gradcheck(f, (q, k, v, beta, S0))


@pytest.mark.parametrize("kind", ["iplr_recurrent", "iplr_transition_product", "dplr_recurrent",
                                  "dplr_transition_product"])
@pytest.mark.parametrize("varlen", [False, True])
def test_generalized_reference_gradcheck(kind, varlen):
    """Gradients w.r.t. q, k, v, a, b, (gk) and initial_state match finite differences."""
    cu = CU if varlen else None
    q, k, v = qkv()
    a, b = t(B, T, H, K, scale=0.3), t(B, T, H, K, scale=0.3)
    S0 = t(len(CU) - 1 if varlen else B, H, K, V)
    fn = getattr(R, kind)
    if kind.startswith("dplr"):
        gk = t(B, T, H, K, scale=0.5)
        f = lambda q, k, v, a, b, gk, S0: fn(q, k, v, a, b, gk, initial_state=S0, output_final_state=True,  # noqa
                                             cu_seqlens=cu)
        assert torch.autograd.gradcheck(f, (q, k, v, a, b, gk, S0))
    else:
        f = lambda q, k, v, a, b, S0: fn(q, k, v, a, b, initial_state=S0, output_final_state=True,  # noqa: E731
                                         cu_seqlens=cu)
        assert torch.autograd.gradcheck(f, (q, k, v, a, b, S0))


@pytest.mark.parametrize("fn", [R.deltaformer_recurrent, R.deltaformer_solve])
@pytest.mark.parametrize("varlen", [False, True])
def test_deltaformer_reference_gradcheck(fn, varlen):
    """Gradients w.r.t. q, k, v and beta match finite differences."""
    cu = CU if varlen else None
    q, k, v = qkv()
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v, beta: fn(q, k, v, beta, cu_seqlens=cu), (q, k, v, beta))
