"""Square normalizing flows: the layers of h (on R^d) and f (on R^D) of a rectangular flow.

Every layer is an ``nn.Module`` with ``forward(x) -> (y, logabsdet)`` and
``inverse(y) -> (x, logabsdet)``; ``logabsdet`` (B,) is log|det ∂output/∂input| of the map
applied. Flat layers take (B, n), image layers (B, C, H, W).

Example:
    >>> import torch
    >>> from rnf_fast.flows import flat_flow
    >>> flow = flat_flow(5, num_layers=2, hidden=(16,))
    >>> x = torch.randn(8, 5)
    >>> y, logabsdet = flow(x)
    >>> x_back, inverse_logabsdet = flow.inverse(y)
    >>> torch.allclose(x_back, x, atol=1e-5), torch.allclose(inverse_logabsdet, -logabsdet)
    (True, True)
"""

from .base import Compose, Flow, Inverse
from .builders import flat_flow, image_flow
from .coupling import MLP, AffineCoupling, Coupling
from .image import (
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    ConvResNet,
    Flatten,
    MultiScale,
    Squeeze,
    Unflatten,
)
from .linear import LULinear, Permutation, Reverse
from .norm import ActNorm
from .spline import RationalQuadraticCoupling, rational_quadratic_spline

__all__ = [
    "MLP",
    "ActNorm",
    "AffineCoupling",
    "ChannelAffineCoupling",
    "CheckerboardAffineCoupling",
    "Compose",
    "ConvResNet",
    "Coupling",
    "Flatten",
    "Flow",
    "Inverse",
    "LULinear",
    "MultiScale",
    "Permutation",
    "RationalQuadraticCoupling",
    "Reverse",
    "Squeeze",
    "Unflatten",
    "flat_flow",
    "image_flow",
    "rational_quadratic_spline",
]
