"""The square flows of a rectangular flow, built from a :class:`FlowConfig`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..flows import ActNorm, Compose, Flow, flat_flow, rational_quadratic_spline
from ..flows.base import check_input, check_positive
from ..flows.builders import image_decoder
from .config import FlowConfig

__all__ = ["ElementwiseSpline", "build_f", "build_h"]


class ElementwiseSpline(Flow):
    """A monotone rational-quadratic spline per feature, with its own learned (unconditional) knots.

    The flow of choice on R^1, where no coupling exists. Identity at initialisation and outside
    [-bound, bound].

    Arguments:
        features: n, the width of x (B, n).
        num_bins: bins per spline (>= 2).
        bound: half-width of the spline interval.
    """

    def __init__(self, features: int, *, num_bins: int = 8, bound: float = 3.0) -> None:
        super().__init__()
        check_positive("features", features)
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.features = features
        self.bound = float(bound)
        self.raw_widths = nn.Parameter(torch.zeros(features, num_bins))
        self.raw_heights = nn.Parameter(torch.zeros(features, num_bins))
        self.raw_derivatives = nn.Parameter(torch.zeros(features, num_bins - 1))

    def _spline(self, x: Tensor, name: str, inverse: bool) -> tuple[Tensor, Tensor]:
        check_input(name, x, (self.features,))
        B = x.shape[0]
        y, logabsdet = rational_quadratic_spline(
            x,
            self.raw_widths.expand(B, -1, -1),
            self.raw_heights.expand(B, -1, -1),
            self.raw_derivatives.expand(B, -1, -1),
            bound=self.bound,
            inverse=inverse,
        )
        return y, logabsdet.sum(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the splines: x (B, n) -> (y (B, n), logabsdet (B,))."""
        return self._spline(x, "x", inverse=False)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the splines: y (B, n) -> (x (B, n), logabsdet (B,))."""
        return self._spline(y, "y", inverse=True)


def build_f(config: FlowConfig) -> Flow:
    """The square flow f on R^D: the decoder-side image flow when ``config.image_shape`` is set
    (``image_decoder``, with the logit layer of ``config.logit_alpha``), else a flat one."""
    if config.image_shape is not None:
        return image_decoder(
            config.image_shape,
            logit_alpha=config.logit_alpha,
            num_scales=config.image_scales,
            blocks_per_scale=config.image_blocks,
            channels=config.image_channels,
            num_res_blocks=config.image_res_blocks,
        )
    return flat_flow(
        config.D,
        num_layers=config.f_layers,
        hidden=config.f_hidden,
        coupling=config.f_coupling,
        num_bins=config.num_bins,
    )


def build_h(config: FlowConfig) -> Flow:
    """The square flow h on R^d: a flat coupling flow, or ActNorm + splines when d = 1."""
    if config.d == 1:
        layers: list[Flow] = []
        for _ in range(config.h_layers):
            layers += [ActNorm(1), ElementwiseSpline(1, num_bins=config.num_bins)]
        return Compose(*layers)
    return flat_flow(
        config.d,
        num_layers=config.h_layers,
        hidden=config.h_hidden,
        coupling=config.h_coupling,
        num_bins=config.num_bins,
    )
