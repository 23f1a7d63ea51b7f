"""The Triton l2norm (used by use_qk_l2norm_in_kernel) against the float64 reference."""
import torch
from hypothesis import given
from hypothesis import strategies as st

import reference
from ops.common.l2norm import l2norm
from properties.strategies import DEVICE, OP_DTYPES
from properties.tolerances import assert_close


@given(rows=st.integers(0, 70), D=st.integers(1, 130), dtype=st.sampled_from(OP_DTYPES), seed=st.integers(0, 2**31))
def test_l2norm_matches_reference(rows, D, dtype, seed, record):
    """y = x / sqrt(|x|^2 + eps) and its gradient agree with float64 within the dtype's bounds.

    At D = 1 the gradient is dy * eps / (x^2 + eps), about 1e-7 of dy: it is all cancellation (dy - y^2 dy), so
    no precision meets a relative bound there and the gradient is checked for D >= 2 only."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, D, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    dy = torch.randn(rows, D, generator=g).to(DEVICE, dtype)
    y = l2norm(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    xr = x.detach().double().requires_grad_()
    yr = reference.l2norm(xr)
    (dxr,) = torch.autograd.grad(yr, xr, dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close("l2norm.y", y, yr, dtype, record=record)
    if D > 1:
        assert_close("l2norm.dx", dx, dxr, dtype, "gradient", record=record)


def test_l2norm_gradcheck():
    """The Triton backward is the derivative of the Triton forward (float64 gradcheck)."""
    x = torch.randn(2, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    assert torch.autograd.gradcheck(l2norm, (x,), eps=1e-6, atol=1e-8)


def test_l2norm_nan_propagates():
    """A NaN in a row gives NaN in that row, and only there."""
    x = torch.randn(3, 8, device=DEVICE)
    x[1, 2] = float("nan")
    y = l2norm(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
