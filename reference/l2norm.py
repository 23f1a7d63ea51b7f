import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last axis, in float64 (the normalization fla's kernels use)."""
    x = x.double()
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)
