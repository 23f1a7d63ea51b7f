"""L2 normalization over the last axis, y = x / sqrt(sum(x^2) + eps), forward and backward in Triton.

Backward: with r = 1 / sqrt(sum(x^2) + eps), dx = r * (dy - y * sum(dy * y))."""
import torch
import triton
import triton.language as tl

from ops.common.utils import acc_dtype, check_device, new_empty, tl_acc


@triton.jit
def l2norm_fwd_kernel(x, y, rstd, M, D, eps, BM: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    b_x = tl.load(x + rows[:, None] * D + cols[None, :], mask=mask, other=0.).to(ACC)
    b_r = 1. / tl.sqrt(tl.sum(b_x * b_x, 1) + eps)
    tl.store(y + rows[:, None] * D + cols[None, :], (b_x * b_r[:, None]).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, b_r, mask=rows < M)


@triton.jit
def l2norm_bwd_kernel(x, rstd, dy, dx, M, D, BM: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    b_x = tl.load(x + rows[:, None] * D + cols[None, :], mask=mask, other=0.).to(ACC)
    b_dy = tl.load(dy + rows[:, None] * D + cols[None, :], mask=mask, other=0.).to(ACC)
    b_r = tl.load(rstd + rows, mask=rows < M, other=0.)
    b_y = b_x * b_r[:, None]
    b_dx = b_r[:, None] * (b_dy - b_y * tl.sum(b_dy * b_y, 1)[:, None])
    tl.store(dx + rows[:, None] * D + cols[None, :], b_dx.to(dx.dtype.element_ty), mask=mask)


def _launch_shape(D):
    BD = triton.next_power_of_2(D)
    BM = max(1, min(64, 4096 // BD))
    return BM, BD


class L2NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        x2 = x.contiguous().view(-1, x.shape[-1]) if x.numel() else x.reshape(0, x.shape[-1])
        M, D = x2.shape
        y = new_empty(x2.shape, x.dtype, x.device)
        rstd = new_empty((M,), acc_dtype(x.dtype), x.device)
        BM, BD = _launch_shape(D)
        if M:
            l2norm_fwd_kernel[(triton.cdiv(M, BM),)](x2, y, rstd, M, D, eps, BM=BM, BD=BD,
                                                     ACC=tl_acc(x.dtype))
        ctx.save_for_backward(x2, rstd)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, rstd = ctx.saved_tensors
        M, D = x2.shape
        dy2 = dy.contiguous().view(M, D)
        dx = new_empty(x2.shape, x2.dtype, x2.device)
        BM, BD = _launch_shape(D)
        if M:
            l2norm_bwd_kernel[(triton.cdiv(M, BM),)](x2, rstd, dy2, dx, M, D, BM=BM, BD=BD,
                                                     ACC=tl_acc(x2.dtype))
        return dx.view(ctx.shape), None


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2, -1) + eps), differentiable; same dtype as x, float32 (float64) arithmetic inside."""
    check_device("x", x)
    return L2NormFunction.apply(x, eps)
