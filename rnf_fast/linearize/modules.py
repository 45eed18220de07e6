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

from ..kernels import scaled_linear

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
            self.out, self._steps = self._primal(z.detach())
        self._WTW: Tensor | None = None

    def _primal(self, x: Tensor) -> tuple[Tensor, list[tuple[Tensor | None, Tensor | None]]]:
        """Run the decoder, returning its output and its Jacobian as a chain of steps
        (W, s): t -> (t Wᵀ) ⊙ s, with W None for an activation not preceded by a Linear and s
        None for a Linear not followed by an activation. Each Linear is fused with the σ'(a) of
        the activation right after it, so one ``scaled_linear`` call serves both."""
        steps: list[tuple[Tensor | None, Tensor | None]] = []
        fusable = False
        for m in self.decoder:
            if isinstance(m, nn.Identity):
                continue
            if isinstance(m, nn.Linear):
                steps.append((m.weight, None))
                fusable = True
            else:
                slope = _derivative(m)(x)
                if fusable:
                    steps[-1] = (steps[-1][0], slope)
                else:
                    steps.append((None, slope))
                fusable = False
            x = m(x)
        return x, steps

    @staticmethod
    def _push(T: Tensor, steps: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
        for W, s in steps:
            T = T * s.unsqueeze(1) if W is None else scaled_linear(T, W, s)
        return T

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        if not create_graph:
            with torch.no_grad():
                return self._push(V, self._steps)
        _, steps = self._primal(self.z)
        return self._push(V, steps)

    @staticmethod
    def _pull(C: Tensor, steps: list[tuple[Tensor | None, Tensor | None]]) -> Tensor:
        for W, s in reversed(steps):
            C = C * s.unsqueeze(1) if W is None else scaled_linear(C, W, s, transpose=True)
        return C

    def vjp(self, W: Tensor) -> Tensor:
        with torch.no_grad():
            return self._pull(W, self._steps)

    def gram(self, *, create_graph: bool = False) -> Tensor | None:
        """A = JᵀJ (B, d, d) without forming J, when the decoder ends in a Linear W (D, n)
        with no activation after it and that is cheaper: J = W M with M (B, n, d) the Jacobian
        up to W's input, so A = Mᵀ (WᵀW) M; WᵀW is computed once per call, and the d tangents
        never pass through the widest layer. Returns None where it does not pay (n too wide).

        Arguments:
            create_graph: differentiable with respect to z and the decoder's parameters.
        """
        W, s = self._steps[-1]
        if W is None or s is not None:
            return None
        B, d = self.z.shape
        D, n = W.shape
        # Multiply-adds: (M G) Mᵀ and G = WᵀW against J = W M and JᵀJ.
        if B * d * n * (n + d) + n * n * D >= B * d * D * (n + d):
            return None
        with torch.set_grad_enabled(create_graph):
            steps = self._primal(self.z)[1] if create_graph else self._steps
            E = torch.eye(d, dtype=self.z.dtype, device=self.z.device).expand(B, d, d)
            MT = self._push(E, steps[:-1])  # (B, d, n): row k is M e_k
            A = (MT @ (W.T @ W)) @ MT.transpose(1, 2)
            return 0.5 * (A + A.transpose(1, 2))

    def gram_mv_hidden(self, V: Tensor) -> tuple[Tensor, Tensor] | None:
        """(M v_k, Jᵀ J v_k) per sample, no graph, where J = W M and W (D, n) is a final Linear
        with no activation after it: Jᵀ J v = Mᵀ ((WᵀW)(M v)) never passes the tangents through
        the widest layer (2 n D multiply-adds per row become n²; WᵀW is formed once, on the first
        call). ``lift`` maps M v to J v. None where this does not pay (n ≥ 2D, or too few rows to
        repay WᵀW even at d iterations).

        Arguments:
            V: (B, K, d) tangents.

        Returns:
            ((B, K, n), (B, K, d)), or None.
        """
        W, s = self._steps[-1]
        if W is None or s is not None:
            return None
        B, K, d = V.shape
        D, n = W.shape
        if 2 * n * D <= n * n or B * K * d * (2 * n * D - n * n) <= n * n * D:
            return None
        with torch.no_grad():
            if self._WTW is None:
                self._WTW = W.T @ W
            H = self._push(V, self._steps[:-1])
            return H, self._pull(H @ self._WTW, self._steps[:-1])

    def lift(self, H: Tensor) -> Tensor:
        """J v from the M v of :meth:`gram_mv_hidden`: H (B, K, n) -> (B, K, D), no graph."""
        with torch.no_grad():
            return H @ self._steps[-1][0].T

    def gram_mv(self, V: Tensor) -> tuple[Tensor, Tensor]:
        JV = self.jvp(V)
        return JV, self.vjp(JV)
