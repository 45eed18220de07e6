"""The linear pieces every explicit rule returns: one layer linearized at its input.

A piece maps tangents T (B, K, *in) to (B, K, *out) (``jvp``) and cotangents C (B, K, *out) to
(B, K, *in) (``vjp``), batched over the B samples and K probes. The rules of :mod:`.modules`
(networks) and :mod:`.flows` (flow layers) build their Jacobians from these: a composition, a
residual, a diagonal scale, a dense layer fused with the activation derivative after it, a
permutation of the entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from torch import Tensor

from ..ops import scaled_linear

__all__ = [
    "Chain",
    "Dense",
    "LayerLinearization",
    "Reindex",
    "Residual",
    "Scale",
    "fold",
    "unfold",
]


class LayerLinearization(Protocol):
    """One layer linearized at its input x (B, *in), output y (B, *out). ``jvp`` keeps a graph
    when grad is enabled and the factors carry one (the differentiable J v)."""

    def jvp(self, T: Tensor) -> Tensor:
        """J t_k per sample: T (B, K, *in) -> (B, K, *out)."""
        ...

    def vjp(self, C: Tensor) -> Tensor:
        """Jᵀ c_k per sample: C (B, K, *out) -> (B, K, *in)."""
        ...


def fold(T: Tensor) -> Tensor:
    """(B, K, *s) -> (B·K, *s)."""
    return T.reshape(T.shape[0] * T.shape[1], *T.shape[2:])


def unfold(Y: Tensor, like: Tensor) -> Tensor:
    """(B·K, *s) -> (B, K, *s), with B and K taken from ``like`` (B, K, ...)."""
    return Y.reshape(like.shape[0], like.shape[1], *Y.shape[1:])


class Chain:
    """The composition parts[-1] ∘ … ∘ parts[0]."""

    def __init__(self, parts: Sequence[LayerLinearization]) -> None:
        self.parts = tuple(parts)

    def jvp(self, T: Tensor) -> Tensor:
        for part in self.parts:
            T = part.jvp(T)
        return T

    def vjp(self, C: Tensor) -> Tensor:
        for part in reversed(self.parts):
            C = part.vjp(C)
        return C


class Residual:
    """t -> t + J_block t (a residual block h + block(h))."""

    def __init__(self, block: LayerLinearization) -> None:
        self.parts = (block,)

    def jvp(self, T: Tensor) -> Tensor:
        return T + self.parts[0].jvp(T)

    def vjp(self, C: Tensor) -> Tensor:
        return C + self.parts[0].vjp(C)


class Scale:
    """A diagonal Jacobian: scale (B, *s) or broadcastable to it (per sample or shared)."""

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale

    def jvp(self, T: Tensor) -> Tensor:
        return T * self.scale.unsqueeze(1)

    def vjp(self, C: Tensor) -> Tensor:
        return C * self.scale.unsqueeze(1)


class Dense:
    """x -> (x weightᵀ) ⊙ s on the last dimension: weight (n_out, n_in), s (B, n_out) or None
    (the derivative of an activation right after the layer, fused into one ``scaled_linear``)."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None) -> None:
        self.weight, self.scale = weight, scale

    def jvp(self, T: Tensor) -> Tensor:
        return scaled_linear(T, self.weight, self.scale)

    def vjp(self, C: Tensor) -> Tensor:
        return scaled_linear(C, self.weight, self.scale, transpose=True)


class Reindex:
    """A permutation of the entries of each sample (its transpose is its inverse), applied as
    the layer's own forward and inverse on the folded batch."""

    def __init__(self, apply: Callable[[Tensor], Tensor], undo: Callable[[Tensor], Tensor]):
        self.apply, self.undo = apply, undo

    def jvp(self, T: Tensor) -> Tensor:
        return unfold(self.apply(fold(T)), T)

    def vjp(self, C: Tensor) -> Tensor:
        return unfold(self.undo(fold(C)), C)
