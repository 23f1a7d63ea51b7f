"""tf32 and tf32x3 products: the CPU's interpreter (patched by properties.interpreter_tf32) and the GPU's tensor
cores round them alike, so a CPU run sees the rounding the GPU's float32 products have."""
import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from properties.interpreter_tf32 import tf32_matmul, tf32x3_matmul
from properties.strategies import DEVICE


@triton.jit
def _dot_kernel(a, b, c, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, PREC: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    x = tl.load(a + rm[:, None] * K + rk[None, :])
    y = tl.load(b + rk[:, None] * N + rn[None, :])
    tl.store(c + rm[:, None] * N + rn[None, :], tl.dot(x, y, input_precision=PREC))


def _rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


@pytest.mark.parametrize("prec", ["tf32", "tf32x3"])
def test_tf32_products_round_as_the_tensor_cores(prec):
    """A float32 tl.dot at tf32 equals the product of the operands truncated to tf32 (the exact product differs
    by ~2^-11 relative), and at tf32x3 Triton's three-part product, near the exact one; on the CPU this holds
    through the patched interpreter, on the GPU it checks that patch's premise."""
    M = N = K = 64
    g = torch.Generator().manual_seed(13)
    a = torch.randn(M, K, generator=g, dtype=torch.float64).float()
    b = torch.randn(K, N, generator=g, dtype=torch.float64).float()
    c = torch.full((M, N), float("nan"), device=DEVICE)
    _dot_kernel[(1,)](a.to(DEVICE), b.to(DEVICE), c, M=M, N=N, K=K, PREC=prec)
    got, an, bn = c.cpu().numpy(), a.numpy(), b.numpy()
    exact = an.astype(np.float64) @ bn.astype(np.float64)
    model = tf32_matmul(an, bn) if prec == "tf32" else tf32x3_matmul(an, bn)
    assert _rel(got, model) < 1e-5
    if prec == "tf32":
        assert _rel(got, exact) > 1e-4  # the truncation shows
    else:
        assert _rel(got, exact) < 1e-5
