"""The one place that owns the error metric and the per-dtype bounds.

Error: ``||x - x_ref|| / ||x_ref||`` (Frobenius norms, in float64), with x_ref the float64 reference evaluated on
the *same rounded inputs* the op saw, so input rounding is not charged to the op. A NaN anywhere is an infinite
error. Bounds are multiples of each dtype's unit roundoff u = 2^-p (p the significand bits):

    dtype      u          forward   gradients
    float64    1.1e-16    1024 u    4096 u
    float32    6.0e-8     512 u     2048 u
    float16    4.9e-4     8 u       32 u
    bfloat16   3.9e-3     4 u       16 u

Where the reference has values below the result dtype's smallest normal number (float16 gradients under strong
decay), the bound gets one allowance on top: the error of those values rounded to that dtype (representable_floor,
0 in the normal range), since no result of that dtype can be closer.

Why these multiples: kernels accumulate in float32 (float64 for float64 inputs), so a half-precision result's
error is its own rounding (about u/2) plus float32/tf32 accumulation error, a few u at most; float32 and float64
results carry the accumulation error of sums over T and K, which grows with T and with the conditioning of the
transitions (the properties draw T up to a few hundred). Gradients pass through one more triangular solve and
reverse recurrence, hence four times the forward bound.
"""
import math
import os

import torch

# Every assert_close appends (test, name, err, bound, dtype, kind) here; properties/conftest.py writes the list
# to $DELTACHECK_RECORD for the report's verification matrix.
RECORDS = []

UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}

FORWARD_ULPS = {torch.float64: 1024, torch.float32: 512, torch.float16: 8, torch.bfloat16: 4}
GRADIENT_ULPS = {torch.float64: 4096, torch.float32: 2048, torch.float16: 32, torch.bfloat16: 16}

# Tolerance for two float64 references of the same function (issue: the four delta-rule forms agree to 1e-12).
REFERENCE_AGREEMENT = 1e-12


def bound(dtype: torch.dtype, kind: str = "forward") -> float:
    """The error bound for results of `dtype`; kind is 'forward' or 'gradient'."""
    table = FORWARD_ULPS if kind == "forward" else GRADIENT_ULPS
    return table[dtype] * UNIT_ROUNDOFF[dtype]


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf if x has a NaN or inf; ||x|| when ref is exactly zero."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(x).all():
        return math.inf
    denom = ref.norm().item()
    num = (x - ref).norm().item()
    return num / denom if denom > 0 else num


def keep(name: str, err: float, bound: float, **fields) -> None:
    """Append one measured error to RECORDS, tagged with the running test."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    RECORDS.append(dict(test=test, name=name, err=err, bound=bound, passed=err <= bound,
                        **{k: str(v) for k, v in fields.items()}))


def representable_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """The part of the reference below `dtype`'s smallest normal number, rounded to dtype, as an error relative to
    the whole reference: what no result stored in dtype can avoid beyond the relative rounding the bounds already
    cover. 0 where the reference lies in dtype's normal range; up to 1 where it underflows (a float16 dgk under
    strong decay can be ~1e-8, below float16's smallest subnormal 6e-8)."""
    if dtype == torch.float64 or not ref.is_floating_point():
        return 0.0
    ref = ref.detach().double().cpu()
    sub = torch.where(ref.abs() < torch.finfo(dtype).tiny, ref, torch.zeros_like(ref))
    denom = ref.norm().item()
    return (sub.to(dtype).double() - sub).norm().item() / denom if denom > 0 else 0.0


def result_bound(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str = "forward") -> float:
    """The bound x is held to against ref: bound(dtype, kind) + representable_floor(ref, x.dtype)."""
    return bound(dtype, kind) + representable_floor(ref, x.dtype)


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, kind: str = "forward",
                 record=None) -> float:
    """Assert rel_err(x, ref) <= result_bound(x, ref, dtype, kind); report the measured error and the bound on
    failure. Every call is kept in RECORDS (through `record`, the conftest fixture, when a test passes it)."""
    err = rel_err(x, ref)
    b = result_bound(x, ref, dtype, kind)
    (record or keep)(name, err, b, dtype=dtype, kind=kind)
    assert err <= b, f"{name}: relative error {err:.3e} > bound {b:.3e} ({kind}, {dtype})"
    return err
