"""The error metric's allowance for a result's own dtype (properties.tolerances.representable_floor)."""
import pytest
import torch

from properties.tolerances import assert_close, bound, representable_floor


def test_underflowing_reference_is_met_by_its_rounding():
    """A float16 gradient whose reference lies below float16's smallest subnormal (~6e-8) is best stored as 0:
    the reference rounded to float16 passes, and the allowance is the whole norm."""
    ref = torch.tensor([0.0, 2.36e-8, -1.0e-8], dtype=torch.float64)
    assert representable_floor(ref, torch.float16) == pytest.approx(1.0)
    assert_close("dgk", ref.to(torch.float16), ref, torch.float16, "gradient")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_normal_range_gets_no_allowance_and_wrong_results_fail(dtype):
    """In the normal range the allowance is 0, so the bound is the stated multiple of u: a result off by a few
    bounds fails."""
    ref = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert representable_floor(ref, dtype) == 0.0
    wrong = (ref * (1 + 4 * bound(dtype, "forward"))).to(dtype)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close("o", wrong, ref, dtype, "forward")


def test_reference_past_the_range_gets_no_allowance():
    """A reference beyond float16's largest finite value (65504) gives no allowance: inf in the result fails."""
    ref = torch.tensor([1.0e6, 1.0], dtype=torch.float64)
    assert representable_floor(ref, torch.float16) == 0.0
    with pytest.raises(AssertionError):
        assert_close("o", ref.to(torch.float16), ref, torch.float16, "forward")
