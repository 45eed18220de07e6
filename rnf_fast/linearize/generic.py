"""The one ``torch.func`` linearization: of a whole decoder, or of one layer of an explicit chain
that has no rule.

:class:`FuncLinearization` serves any differentiable map (B, *in) -> (B, *out) with rows
independent: the VJP closure is built once and reused by every CG iteration; J v comes from
``torch.func.jvp`` with all K tangents batched by ``vmap`` (one primal, K tangents), or, where
vmap cannot handle the map, from z repeated K times along the batch (the reason is recorded in
``fallback_reason``). :class:`FuncLayer` puts the same object inside an explicit chain of
:mod:`.modules` or :mod:`.flows`.

Not ``torch.func.linearize``: it re-traces the decoder on every call and its JVP passes no
gradient back to z or to the decoder's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from .base import Batching, Linearization
from .pieces import fold, unfold

__all__ = ["FuncLayer", "FuncLinearization", "fallback_layers", "func_fallbacks"]


class FuncLinearization(Linearization):
    """Generic :class:`~rnf_fast.Linearization` of any differentiable map through ``torch.func``.

    Arguments:
        decoder: callable mapping (B, *in) to (B, *out) (a decoder: (B, d) to (B, D)), rows
            independent.
        z: (B, *in) the point of linearization (may require grad).
        batching: how K tangents are batched. ``"vmap"`` maps ``torch.func.jvp``/``vjp`` over
            them (one primal, K tangents). ``"repeat"`` is the fallback for maps that vmap
            cannot handle (data-dependent control flow, ``.item()``, unsupported ops): z is
            repeated K times along the batch (B·K rows) and each row gets one tangent, which
            costs K primal rows instead of one but needs nothing beyond ``torch.func.jvp``.
            ``"auto"`` tries vmap and falls back to repeat for good the first time vmap raises.

    Attributes:
        batching: the batching requested, then ``"vmap"`` or ``"repeat"`` once used.
        fallback_reason: the first line of vmap's error when ``"auto"`` fell back, else None.

    Example:
        >>> decoder = lambda z: torch.cat([z.sin(), z.cos()], dim=1)
        >>> lin = FuncLinearization(decoder, torch.randn(3, 2), batching="auto")
        >>> lin.jvp(torch.randn(3, 4, 2)).shape, lin.batching, lin.fallback_reason
        (torch.Size([3, 4, 4]), 'vmap', None)
    """

    path = "generic"

    def __init__(
        self, decoder: Callable[[Tensor], Tensor], z: Tensor, *, batching: Batching
    ) -> None:
        if batching not in ("auto", "vmap", "repeat"):
            raise ValueError(f"batching must be 'auto', 'vmap' or 'repeat', got {batching!r}")
        self.decoder = decoder
        self.z = z
        self.batching = batching
        self.fallback_reason: str | None = None
        self._auto = batching == "auto"
        self._z0 = z.detach()
        self._out: Tensor | None = None
        self._vjp_fn: Callable | None = None
        self._vjp_K: int | None = None

    @property
    def out(self) -> Tensor:
        """(B, *out) the map's output at z, detached."""
        if self._out is None:
            with torch.no_grad():
                self._out = self.decoder(self._z0)
        return self._out

    def _run(self, vmapped: Callable, repeated: Callable, *args: Tensor):
        if self.batching == "repeat":
            return repeated(*args)
        if not self._auto:
            return vmapped(*args)
        try:
            result = vmapped(*args)
        except Exception as exc:  # vmap's failures are RuntimeError, NotImplementedError, ...
            self.batching = "repeat"
            self.fallback_reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return repeated(*args)
        self.batching = "vmap"
        return result

    def _repeat(self, z: Tensor, K: int) -> Tensor:
        """z (B, *in) -> (B·K, *in), each row K times in a row."""
        return fold(z.unsqueeze(1).expand(z.shape[0], K, *z.shape[1:]))

    def _jvp_vmap(self, z: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        def one(v: Tensor) -> tuple[Tensor, Tensor]:
            return _jvp(self.decoder, (z,), (v,))

        out, JV = vmap(one, in_dims=1, out_dims=(None, 1), randomness="same")(V)
        return out, JV

    def _jvp_repeat(self, z: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        out, JV = _jvp(self.decoder, (self._repeat(z, V.shape[1]),), (fold(V),))
        return unfold(out, V)[:, 0], unfold(JV, V)

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        """J v_k per sample: V (B, K, *in) -> (B, K, *out); differentiable with respect to z and
        the map's parameters with ``create_graph``."""
        z = self.z if create_graph else self._z0
        with torch.set_grad_enabled(create_graph):
            out, JV = self._run(self._jvp_vmap, self._jvp_repeat, z, V)
        if self._out is None:
            self._out = out.detach()
        return JV

    def _vjp_vmap(self, C: Tensor) -> Tensor:
        if self._vjp_fn is None or self._vjp_K is not None:
            out, self._vjp_fn = _vjp(self.decoder, self._z0)
            self._vjp_K = None
            if self._out is None:
                self._out = out
        fn = self._vjp_fn
        return vmap(lambda c: fn(c)[0], in_dims=1, out_dims=1)(C)

    def _vjp_repeat(self, C: Tensor) -> Tensor:
        K = C.shape[1]
        if self._vjp_fn is None or self._vjp_K != K:
            _, self._vjp_fn = _vjp(self.decoder, self._repeat(self._z0, K))
            self._vjp_K = K
        return unfold(self._vjp_fn(fold(C))[0], C)

    def vjp(self, C: Tensor) -> Tensor:
        """Jᵀ c_k per sample, no graph: C (B, K, *out) -> (B, K, *in)."""
        with torch.no_grad():
            return self._run(self._vjp_vmap, self._vjp_repeat, C)


class FuncLayer:
    """One layer of an explicit chain without a rule, linearized by :class:`FuncLinearization`
    at its input x (B, *in): a :class:`~rnf_fast.linearize.pieces.LayerLinearization` whose
    ``jvp`` keeps a graph when grad is enabled, as the explicit pieces do.

    Arguments:
        fn: the layer as a map (B, *in) -> (B, *out).
        x: (B, *in) its input (carrying a graph when the chain is built for the
            differentiable J v).
        name: how the layer is named in ``fallback_reason``.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, name: str) -> None:
        self.name = name
        self.lin = FuncLinearization(fn, x, batching="auto")

    @property
    def batching(self) -> str:
        """``"auto"`` until used, then ``"vmap"`` or ``"repeat"``."""
        return self.lin.batching

    @property
    def fallback_reason(self) -> str | None:
        """Why vmap was abandoned for this layer, if it was."""
        return self.lin.fallback_reason

    def jvp(self, T: Tensor) -> Tensor:
        return self.lin.jvp(T, create_graph=torch.is_grad_enabled())

    def vjp(self, C: Tensor) -> Tensor:
        return self.lin.vjp(C)


def fallback_layers(lin: object) -> list[FuncLayer]:
    """The pieces of an explicit chain that went through ``torch.func``, in chain order."""
    if isinstance(lin, FuncLayer):
        return [lin]
    return [layer for part in getattr(lin, "parts", ()) for layer in fallback_layers(part)]


def func_fallbacks(lin: object) -> list[str]:
    """Names of the pieces of an explicit chain that went through ``torch.func``."""
    return [layer.name for layer in fallback_layers(lin)]
