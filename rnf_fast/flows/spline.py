"""Monotone rational-quadratic spline couplings (Durkan et al., 2019, "Neural Spline Flows").

On [-bound, bound] each transformed feature goes through a monotone rational-quadratic spline
with K bins whose widths, heights and interior knot derivatives come from the conditioner;
outside it the map is the identity (linear tails of slope 1, matching the boundary derivatives,
so the map is C¹ across ±bound).

In bin k, with knots (x_k, y_k), width w_k, height h_k, slope s_k = h_k / w_k, knot derivatives
δ_k, δ_{k+1} and ξ = (x - x_k) / w_k ∈ [0, 1]:

    y = y_k + h_k [s_k ξ² + δ_k ξ(1-ξ)] / [s_k + (δ_{k+1} + δ_k - 2 s_k) ξ(1-ξ)]
    dy/dx = s_k² [δ_{k+1} ξ² + 2 s_k ξ(1-ξ) + δ_k (1-ξ)²] / [s_k + (δ_{k+1} + δ_k - 2 s_k) ξ(1-ξ)]²

The inverse solves a ξ² + b ξ + c = 0 in the bin containing y, with the root taken in the form
ξ = 2c / (-b - √(b² - 4ac)), which does not cancel when a ≈ 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import check_positive
from .coupling import Coupling

__all__ = ["RationalQuadraticCoupling", "rational_quadratic_spline"]


def _knots(raw: Tensor, bound: float, min_size: float) -> Tensor:
    """Knot positions (..., K + 1) from -bound to bound, bins at least 2·bound·min_size wide."""
    K = raw.shape[-1]
    fractions = min_size + (1 - min_size * K) * torch.softmax(raw, dim=-1)
    inner = 2 * bound * torch.cumsum(fractions[..., :-1], dim=-1) - bound
    ends = inner.new_full((*inner.shape[:-1], 1), bound)
    return torch.cat([-ends, inner, ends], dim=-1)


def _gather(values: Tensor, index: Tensor) -> Tensor:
    """values (..., M) at index (...,) -> (...,)."""
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    x: Tensor,
    raw_widths: Tensor,
    raw_heights: Tensor,
    raw_derivatives: Tensor,
    *,
    bound: float,
    inverse: bool = False,
    min_bin_size: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Apply the monotone rational-quadratic spline (or its inverse) elementwise.

    Widths and heights are softmax-normalised (each bin at least ``min_bin_size`` of the
    interval); interior knot derivatives are δ = m + (1 - m) · softplus(raw) / log 2 with
    m = ``min_derivative``, so raw = 0 gives δ = 1 and all-zero raw parameters give the identity.
    The boundary derivatives are 1, matching the identity tails outside [-bound, bound].

    Arguments:
        x: (...) inputs (the spline's outputs when ``inverse``).
        raw_widths, raw_heights: (..., K) unnormalised bin widths and heights.
        raw_derivatives: (..., K - 1) unnormalised derivatives at the interior knots.
        bound: half-width of the interval covered by the spline.
        inverse: apply the inverse map instead.

    Returns:
        (y, logabsdet), both (...): the mapped values and log|dy/dx| of the map applied.
    """
    xknots = _knots(raw_widths, bound, min_bin_size)
    yknots = _knots(raw_heights, bound, min_bin_size)
    inner = min_derivative + (1 - min_derivative) * F.softplus(raw_derivatives) / math.log(2)
    deriv = F.pad(inner, (1, 1), value=1.0)

    inside = (x >= -bound) & (x <= bound)
    xc = x.clamp(-bound, bound)
    search = yknots if inverse else xknots
    k = (xc.unsqueeze(-1) >= search[..., 1:-1]).sum(-1)
    x_k, y_k = _gather(xknots, k), _gather(yknots, k)
    w = _gather(xknots, k + 1) - x_k
    h = _gather(yknots, k + 1) - y_k
    d0, d1 = _gather(deriv, k), _gather(deriv, k + 1)
    s = h / w
    curvature = d1 + d0 - 2 * s

    if inverse:
        dy = xc - y_k
        a = h * (s - d0) + dy * curvature
        b = h * d0 - dy * curvature
        c = -s * dy
        xi = 2 * c / (-b - torch.sqrt((b * b - 4 * a * c).clamp_min(0)))
    else:
        xi = (xc - x_k) / w
    t = xi * (1 - xi)
    denom = s + curvature * t
    numer = s * s * (d1 * xi * xi + 2 * s * t + d0 * (1 - xi) ** 2)
    log_deriv = torch.log(numer) - 2 * torch.log(denom)
    if inverse:
        out, log_deriv = x_k + xi * w, -log_deriv
    else:
        out = y_k + h * (s * xi * xi + d0 * t) / denom
    return torch.where(inside, out, x), torch.where(inside, log_deriv, torch.zeros_like(x))


class RationalQuadraticCoupling(Coupling):
    """A coupling whose transformed features go through monotone rational-quadratic splines.

    Identity at initialisation (zeroed conditioner output) and outside [-bound, bound].

    Arguments:
        features: n, the width of x (B, n); at least 2.
        hidden, activation: of the conditioner ``MLP``.
        mask: (n,) booleans, True where the feature is transformed; default: the last n - n // 2.
        num_bins: K, bins per spline (>= 2).
        bound: half-width of the spline interval.
        min_bin_size: smallest bin width and height, as a fraction of 2·bound.
        min_derivative: smallest interior knot derivative.
    """

    def __init__(
        self,
        features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        mask: Tensor | Sequence[bool] | None = None,
        num_bins: int = 8,
        bound: float = 3.0,
        min_bin_size: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        check_positive("num_bins", num_bins)
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be finite and > 0, got {bound}")
        if not 0 < min_bin_size * num_bins < 1:
            raise ValueError(f"min_bin_size must be in (0, 1 / num_bins), got {min_bin_size}")
        if not 0 < min_derivative < 1:
            raise ValueError(f"min_derivative must be in (0, 1), got {min_derivative}")
        super().__init__(
            features,
            params_per_feature=3 * num_bins - 1,
            mask=mask,
            hidden=hidden,
            activation=activation,
        )
        self.num_bins = num_bins
        self.bound = float(bound)
        self.min_bin_size = float(min_bin_size)
        self.min_derivative = float(min_derivative)

    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Elementwise splines: x (B, m), params (B, m, 3K - 1) -> (y, log|dy/dx|), both (B, m)."""
        K = self.num_bins
        return rational_quadratic_spline(
            x,
            params[..., :K],
            params[..., K : 2 * K],
            params[..., 2 * K :],
            bound=self.bound,
            inverse=inverse,
            min_bin_size=self.min_bin_size,
            min_derivative=self.min_derivative,
        )
