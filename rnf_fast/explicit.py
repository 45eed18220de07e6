"""Explicit linearization of plain MLP decoders: ``nn.Sequential`` of ``nn.Linear`` and
elementwise activations.

Evaluating the decoder once at z caches each activation's derivative σ'(a) (B, n). Then
J v is a chain of GEMMs with a diagonal scale after each activation, Jᵀ w the same chain
backwards, and Jᵀ(J v) both, batched over all K tangents (B·K rows per GEMM), with no primal
recompute and no autograd graph. The differentiable J v of the estimators' surrogate re-runs the
primal once with the graph and pushes all tangents through the same explicit chain, so autograd
differentiates GEMMs and σ'(a) (σ'' terms included) instead of ``torch.func``'s dual tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["SequentialLinearization", "supports_sequential"]


def _softplus_grad(m: nn.Softplus) -> Callable[[Tensor], Tensor]:
    def grad(a: Tensor) -> Tensor:
        ba = a * m.beta
        return torch.where(ba > m.threshold, torch.ones_like(a), torch.sigmoid(ba))

    return grad


def _silu_grad(a: Tensor) -> Tensor:
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _gelu_grad(a: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(a * 0.7071067811865476))
    pdf = torch.exp(-0.5 * a * a) * 0.3989422804014327
    return cdf + a * pdf


def _derivative(m: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """σ' as a differentiable function of the pre-activation a, or None if unsupported."""
    if isinstance(m, nn.Tanh):
        return lambda a: 1 - torch.tanh(a) ** 2
    if isinstance(m, nn.Sigmoid):
        return lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a))
    if isinstance(m, nn.ReLU):
        return lambda a: (a > 0).to(a.dtype)
    if isinstance(m, nn.LeakyReLU):
        return lambda a: torch.where(a > 0, 1.0, torch.full_like(a, m.negative_slope))
    if isinstance(m, nn.ELU):
        return lambda a: torch.where(a > 0, torch.ones_like(a), m.alpha * torch.exp(a))
    if isinstance(m, nn.Softplus):
        return _softplus_grad(m)
    if isinstance(m, nn.SiLU):
        return _silu_grad
    if isinstance(m, nn.GELU) and m.approximate == "none":
        return _gelu_grad
    return None


def supports_sequential(decoder: object) -> bool:
    """Whether ``decoder`` is an ``nn.Sequential`` this module linearizes explicitly: only
    ``nn.Linear``, ``nn.Identity`` and the supported elementwise activations (Tanh, Sigmoid,
    ReLU, LeakyReLU, ELU, Softplus, SiLU, exact GELU), at least one Linear, no hooks."""
    if not isinstance(decoder, nn.Sequential) or len(decoder) == 0:
        return False
    if decoder._forward_hooks or decoder._forward_pre_hooks:
        return False
    has_linear = False
    for m in decoder:
        if m._forward_hooks or m._forward_pre_hooks:
            return False
        if isinstance(m, nn.Linear):
            has_linear = True
        elif not isinstance(m, nn.Identity) and _derivative(m) is None:
            return False
    return has_linear


class SequentialLinearization:
    """:class:`rnf_fast.Linearization` of a supported ``nn.Sequential`` MLP at z.

    Arguments:
        decoder: an ``nn.Sequential`` for which :func:`supports_sequential` holds.
        z: (B, d) the point (may require grad).
    """

    batching = "explicit"
    fallback_reason = None

    def __init__(self, decoder: nn.Sequential, z: Tensor):
        if not supports_sequential(decoder):
            raise TypeError(
                "decoder must be an nn.Sequential of Linear layers and supported "
                "elementwise activations"
            )
        self.decoder = decoder
        self.z = z
        with torch.no_grad():
            self.out, self._scales = self._primal(z.detach())

    def _primal(self, x: Tensor) -> tuple[Tensor, list[Tensor | None]]:
        """Run the decoder, returning its output and per layer σ'(a) (None for Linear)."""
        scales: list[Tensor | None] = []
        for m in self.decoder:
            if isinstance(m, nn.Identity):
                scales.append(None)
                continue
            if isinstance(m, nn.Linear):
                scales.append(None)
            else:
                scales.append(_derivative(m)(x))
            x = m(x)
        return x, scales

    def _push(self, T: Tensor, scales: list[Tensor | None]) -> Tensor:
        for m, s in zip(self.decoder, scales):
            if isinstance(m, nn.Linear):
                T = T @ m.weight.T
            elif s is not None:
                T = T * s.unsqueeze(1)
        return T

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        if not create_graph:
            with torch.no_grad():
                return self._push(V, self._scales)
        _, scales = self._primal(self.z)
        return self._push(V, scales)

    def vjp(self, W: Tensor) -> Tensor:
        with torch.no_grad():
            T = W
            for m, s in zip(reversed(self.decoder), reversed(self._scales)):
                if isinstance(m, nn.Linear):
                    T = T @ m.weight
                elif s is not None:
                    T = T * s.unsqueeze(1)
            return T

    def gram_mv(self, V: Tensor) -> tuple[Tensor, Tensor]:
        JV = self.jvp(V)
        return JV, self.vjp(JV)
