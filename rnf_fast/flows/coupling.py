"""MLP conditioners and flat coupling layers (RealNVP affine couplings).

A coupling splits the n features of x (B, n) by a fixed mask: the masked-out features pass through
unchanged and feed a conditioner MLP, whose outputs parametrise an elementwise bijection of the
masked-in features. The Jacobian is triangular, so log|det| is the sum of the elementwise
log-derivatives.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .base import Flow, check_input, check_positive

__all__ = ["ACTIVATIONS", "MLP", "AffineCoupling", "AffineTerms", "Coupling", "affine_map"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


class MLP(nn.Module):
    """A fully connected network in_features -> hidden... -> out_features, last layer zeroed.

    The last layer starts with zero weight and bias, so the network outputs 0 and every coupling it
    conditions starts as the identity.

    Arguments:
        in_features, out_features: input and output widths.
        hidden: widths of the hidden layers (may be empty: one linear layer).
        activation: one of ``ACTIVATIONS``; the default ``"tanh"`` is smooth, so the Jacobian of a
            flow built on it is continuous in its input, which the gradient of log det(JᵀJ)
            relies on.

    Shapes: (B, in_features) -> (B, out_features).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        check_positive("in_features", in_features)
        check_positive("out_features", out_features)
        for i, width in enumerate(hidden):
            check_positive(f"hidden[{i}]", width)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        widths = [in_features, *hidden, out_features]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.activation = activation
        self.act = ACTIVATIONS[activation]()
        nn.init.zeros_(self.linears[-1].weight)
        nn.init.zeros_(self.linears[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network: x (B, in_features) -> (B, out_features)."""
        for linear in self.linears[:-1]:
            x = self.act(linear(x))
        return self.linears[-1](x)


def _split_indices(features: int, mask: Tensor | Sequence[bool] | None) -> tuple[Tensor, Tensor]:
    """The (conditioning, transformed) feature indices of a mask; None splits in half."""
    if mask is None:
        mask = torch.arange(features) >= features // 2
    mask = torch.as_tensor(mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be boolean, got {mask.dtype}")
    if tuple(mask.shape) != (features,):
        raise ValueError(f"mask must be ({features},), got {tuple(mask.shape)}")
    if mask.all() or not mask.any():
        raise ValueError("mask must have at least one True and one False entry")
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


class Coupling(Flow):
    """Base class of the flat couplings: y_T = τ(x_T; c(x_C)), y_C = x_C.

    Subclasses give the number of conditioner outputs per transformed feature and the elementwise
    map ``transform(x_T, params, inverse) -> (y_T, elementwise log|derivative|)``.

    Arguments:
        features: n, the width of x (B, n); at least 2.
        params_per_feature: conditioner outputs per transformed feature.
        mask: (n,) booleans, True where the feature is transformed, False where it passes through
            and feeds the conditioner; default: the last n - n // 2 features are transformed.
        hidden, activation: of the conditioner ``MLP``.
    """

    def __init__(
        self,
        features: int,
        *,
        params_per_feature: int,
        mask: Tensor | Sequence[bool] | None,
        hidden: Sequence[int],
        activation: str,
    ) -> None:
        super().__init__()
        check_positive("features", features)
        if features < 2:
            raise ValueError(f"features must be >= 2 for a coupling, got {features}")
        self.features = features
        cond, trans = _split_indices(features, mask)
        self.register_buffer("cond_index", cond)
        self.register_buffer("trans_index", trans)
        self.params_per_feature = params_per_feature
        self.conditioner = MLP(
            len(cond), params_per_feature * len(trans), hidden=hidden, activation=activation
        )

    @abstractmethod
    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """The elementwise map: x (B, m), params (B, m, p) -> (y (B, m), log|dy/dx| (B, m))."""

    def _couple(self, x: Tensor, name: str, inverse: bool) -> tuple[Tensor, Tensor]:
        check_input(name, x, (self.features,))
        x_t = x.index_select(1, self.trans_index)
        params = self.conditioner(x.index_select(1, self.cond_index))
        params = params.view(x.shape[0], x_t.shape[1], self.params_per_feature)
        y_t, logabsdet = self.transform(x_t, params, inverse)
        return x.index_copy(1, self.trans_index, y_t), logabsdet.sum(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the coupling: x (B, n) -> (y (B, n), logabsdet (B,))."""
        return self._couple(x, "x", inverse=False)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the coupling: y (B, n) -> (x (B, n), logabsdet (B,))."""
        return self._couple(y, "y", inverse=True)


class AffineTerms(NamedTuple):
    """The soft-clamped affine map of :func:`affine_map` and the terms its Jacobian reuses, all
    of the shape of x.

    Attributes:
        y: the output.
        log_scale: log|∂y/∂x| = s (forward) or -s (inverse).
        scale: ∂y/∂x = exp(log_scale).
        clamp_slope: ∂s/∂raw = 1 - tanh²(raw / clamp), the soft clamp's derivative.
        scaled: x · exp(s) (forward, y without the shift) or y (inverse); ∂y/∂raw is
            ± scaled · clamp_slope.
    """

    y: Tensor
    log_scale: Tensor
    scale: Tensor
    clamp_slope: Tensor
    scaled: Tensor


def affine_map(x: Tensor, raw: Tensor, shift: Tensor, clamp: float, inverse: bool) -> AffineTerms:
    """The affine coupling map y = x · exp(s) + shift with the soft-clamped log-scale
    s = clamp · tanh(raw / clamp), or its inverse y = (x - shift) · exp(-s), elementwise.

    The one implementation of the map: the flat and image affine couplings apply it, and their
    explicit linearizations take its Jacobian from the same terms.

    Arguments:
        x, raw, shift: tensors of one shape (B, ...): the input, the unclamped log-scale and
            the shift.
        clamp: the bound of the soft clamp clamp · tanh(raw / clamp): slope 1 at 0, values in
            (-clamp, clamp).
        inverse: apply the inverse map.

    Returns:
        :class:`AffineTerms`.

    Example:
        >>> x, raw, shift = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
        >>> y = affine_map(x, raw, shift, 3.0, False).y
        >>> torch.allclose(affine_map(y, raw, shift, 3.0, True).y, x, atol=1e-6)
        True
    """
    th = torch.tanh(raw / clamp)
    # Unused by a plain forward (two elementwise ops), and then absent from its backward.
    clamp_slope = 1 - th * th
    log_scale = clamp * th
    if inverse:
        log_scale = -log_scale
        scale = torch.exp(log_scale)
        y = (x - shift) * scale
        return AffineTerms(y, log_scale, scale, clamp_slope, y)
    scale = torch.exp(log_scale)
    scaled = x * scale
    return AffineTerms(scaled + shift, log_scale, scale, clamp_slope, scaled)


def check_clamp(log_scale_clamp: float) -> None:
    """Raise unless log_scale_clamp is a finite positive number."""
    if not (math.isfinite(log_scale_clamp) and log_scale_clamp > 0):
        raise ValueError(f"log_scale_clamp must be finite and > 0, got {log_scale_clamp}")


class AffineCoupling(Coupling):
    """The RealNVP affine coupling y_T = x_T · exp(s) + t, (s, t) = MLP(x_C).

    The log-scale is soft-clamped, s = c · tanh(ŝ / c) with c = ``log_scale_clamp``: each layer
    scales by at most exp(±c) (exp(3) ≈ 20 by default), which keeps early training and the
    inverse stable, while the slope 1 at ŝ = 0 leaves small scales unchanged.

    Arguments:
        features: n, the width of x (B, n); at least 2.
        hidden, activation: of the conditioner ``MLP`` (zero-initialised: identity at start).
        mask: (n,) booleans, True where the feature is transformed; default: the last n - n // 2.
        log_scale_clamp: c above.
    """

    def __init__(
        self,
        features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        activation: str = "tanh",
        mask: Tensor | Sequence[bool] | None = None,
        log_scale_clamp: float = 3.0,
    ) -> None:
        super().__init__(
            features, params_per_feature=2, mask=mask, hidden=hidden, activation=activation
        )
        check_clamp(log_scale_clamp)
        self.log_scale_clamp = float(log_scale_clamp)

    def transform(self, x: Tensor, params: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """Elementwise affine map: x (B, m), params (B, m, 2) -> (y (B, m), log|dy/dx| (B, m))."""
        terms = affine_map(x, params[..., 0], params[..., 1], self.log_scale_clamp, inverse)
        return terms.y, terms.log_scale
