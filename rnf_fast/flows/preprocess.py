"""Preprocessing bijections of image flows: the logit transform of dequantised pixels.

Pixels x in [0, 1) (after uniform dequantisation) are squeezed into [α, 1 - α] and mapped to the
real line, y = logit(α + (1 - 2α) x), where a coupling flow can model them. Kept as a ``Flow``
layer rather than a preprocessing step, so that a model which ends with its inverse (the
sigmoid) has its Jacobian, its log det and its density in pixel space.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import Flow

__all__ = ["Logit"]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise TypeError(f"alpha must be a float, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and 0 <= alpha < 0.5):
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha!r}")
    return float(alpha)


def _check_tensor(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(
            f"{name} must be a floating tensor (B, ...), got {x.dtype} {tuple(x.shape)}"
        )


class Logit(Flow):
    """y = logit(α + (1 - 2α) x), elementwise on x (B, ...) in [0, 1]; inverse: a scaled sigmoid.

    log|det ∂y/∂x| = Σ [log(1 - 2α) - log p - log(1 - p)],  p = α + (1 - 2α) x.

    The inverse x = (σ(y) - α) / (1 - 2α) has log|det| = Σ [log σ(y) + log σ(-y) - log(1 - 2α)],
    computed with softplus so it stays finite for large |y|. With α > 0 every x in [0, 1] has a
    finite image (α = 1e-6 is the choice for MNIST of Papamakarios et al., 2017; RealNVP used
    0.05 on CIFAR-10).

    Arguments:
        alpha: α in [0, 0.5), the margin kept from 0 and 1.

    Example:
        >>> layer = Logit(alpha=1e-6)
        >>> x = torch.tensor([[0.25, 0.5, 0.75]], dtype=torch.float64)
        >>> y, logabsdet = layer(x)
        >>> torch.allclose(layer.inverse(y)[0], x), torch.allclose(layer.inverse(y)[1], -logabsdet)
        (True, True)
    """

    def __init__(self, *, alpha: float = 1e-6) -> None:
        super().__init__()
        self.alpha = _check_alpha(alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map pixels to logits: x (B, ...) in [0, 1] -> (y (B, ...), logabsdet (B,))."""
        _check_tensor("x", x)
        p = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(p) - torch.log1p(-p)
        log_derivative = math.log1p(-2 * self.alpha) - torch.log(p) - torch.log1p(-p)
        return y, log_derivative.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Map logits to pixels: y (B, ...) -> (x (B, ...) in [0, 1], logabsdet (B,))."""
        _check_tensor("y", y)
        x = (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)
        # log σ(y) + log σ(-y) = -softplus(-y) - softplus(y)
        log_derivative = -F.softplus(-y) - F.softplus(y) - math.log1p(-2 * self.alpha)
        return x, log_derivative.flatten(1).sum(1)
