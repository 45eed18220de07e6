"""The flow contract, sequential composition, inversion, and shared input checks.

A flow is an ``nn.Module`` with ``forward(x) -> (y, logabsdet)`` and
``inverse(y) -> (x, logabsdet)``, where ``logabsdet`` (B,) is log|det ∂output/∂input| of the map
being applied; the inverse's is minus the forward's at the matching point.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Compose", "Flow", "Inverse"]


class Flow(nn.Module, ABC):
    """A bijection with a tractable log|det| of its Jacobian, in both directions."""

    @abstractmethod
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the map: returns (y, logabsdet), logabsdet (B,) = log|det ∂y/∂x|."""

    @abstractmethod
    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the inverse map: returns (x, logabsdet), logabsdet (B,) = log|det ∂x/∂y|."""


class Compose(Flow):
    """The sequential flow layers[-1] ∘ … ∘ layers[0]; log-dets add up.

    Arguments:
        *layers: at least one ``Flow``, applied in the given order by ``forward`` and in reverse
            order by ``inverse``.
    """

    def __init__(self, *layers: Flow) -> None:
        super().__init__()
        if not layers:
            raise ValueError("Compose needs at least one layer, got 0")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Flow):
                raise TypeError(f"layers[{i}] must be a Flow, got {type(layer).__name__}")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply every layer in order: x (B, ...) -> (y (B, ...), logabsdet (B,))."""
        logabsdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logabsdet = logabsdet + ld
        return x, logabsdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert every layer in reverse order: y (B, ...) -> (x (B, ...), logabsdet (B,))."""
        logabsdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y)
            logabsdet = logabsdet + ld
        return y, logabsdet


class Inverse(Flow):
    """The inverse of a flow: ``forward`` is ``layer.inverse`` and ``inverse`` is ``layer.forward``.

    Arguments:
        layer: the ``Flow`` to invert (its parameters are shared, not copied).
    """

    def __init__(self, layer: Flow) -> None:
        super().__init__()
        if not isinstance(layer, Flow):
            raise TypeError(f"layer must be a Flow, got {type(layer).__name__}")
        self.layer = layer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``layer.inverse``: returns (y, logabsdet (B,))."""
        return self.layer.inverse(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Apply ``layer.forward``: returns (x, logabsdet (B,))."""
        return self.layer(y)


def _check_float(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")


def check_input(name: str, x: Tensor, shape: Sequence[int]) -> None:
    """Raise unless x is a floating tensor of shape (B, *shape), naming the argument ``name``."""
    _check_float(name, x)
    if x.dim() != len(shape) + 1 or tuple(x.shape[1:]) != tuple(shape):
        expected = ", ".join(str(s) for s in shape)
        raise ValueError(f"{name} must be (B, {expected}), got {tuple(x.shape)}")


def check_channels(name: str, x: Tensor, channels: int) -> None:
    """Raise unless x is a floating tensor of shape (B, channels) or (B, channels, H, W)."""
    _check_float(name, x)
    if x.dim() not in (2, 4) or x.shape[1] != channels:
        raise ValueError(
            f"{name} must be (B, {channels}) or (B, {channels}, H, W), got {tuple(x.shape)}"
        )


def check_image(name: str, x: Tensor, channels: int) -> None:
    """Raise unless x is a floating tensor of shape (B, channels, H, W)."""
    _check_float(name, x)
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be (B, {channels}, H, W), got {tuple(x.shape)}")


def check_positive(name: str, value: int) -> None:
    """Raise unless value is an int >= 1, naming the argument ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Return shape as a tuple, raising unless it is (C, H, W) of positive ints."""
    shape = tuple(shape)
    if len(shape) != 3:
        raise ValueError(f"shape must be (C, H, W), got {shape}")
    for name, size in zip("CHW", shape, strict=True):
        check_positive(f"shape {name}", size)
    return shape
