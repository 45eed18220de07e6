"""The decoder linearized at z: J v, Jᵀ w and Jᵀ(J v), batched over probes.

:class:`Linearization` is the seam between the estimators and whatever computes Jacobian
products. :class:`FuncLinearization` implements it for any differentiable decoder with
``torch.func``: the VJP closure is built once and reused by every CG iteration; J v comes from
``torch.func.jvp`` with all K tangents batched by ``vmap`` (one primal, K tangents). Faster,
layer-aware linearizations plug in behind the same interface.

Not ``torch.func.linearize``: it re-traces the decoder on every call and its JVP passes no
gradient back to z or to the decoder's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.func import jvp as _jvp
from torch.func import vjp as _vjp
from torch.func import vmap

from .modules import SequentialLinearization, supports_sequential

__all__ = ["FuncLinearization", "Linearization", "linearize"]

Batching = Literal["auto", "vmap", "repeat"]


@runtime_checkable
class Linearization(Protocol):
    """A decoder linearized at z (B samples, latent dim d, ambient dim D).

    Attributes:
        z: (B, d) the point, as given (it may require grad).
        out: (B, D) the decoder's output at z, detached.
    """

    z: Tensor
    out: Tensor

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        """J v_k per sample: V (B, K, d) -> (B, K, D). With ``create_graph`` the result is
        differentiable with respect to z and the decoder's parameters."""
        ...

    def vjp(self, W: Tensor) -> Tensor:
        """Jᵀ w_k per sample, no graph: W (B, K, D) -> (B, K, d)."""
        ...

    def gram_mv(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """(J v_k, Jᵀ J v_k) per sample, no graph: V (B, K, d) -> ((B, K, D), (B, K, d))."""
        ...


class FuncLinearization:
    """Generic :class:`Linearization` of any differentiable decoder through ``torch.func``.

    Arguments:
        decoder: callable mapping (B, d) to (B, D), rows independent.
        z: (B, d) the point of linearization (may require grad).
        batching: how K tangents are batched. ``"vmap"`` maps ``torch.func.jvp``/``vjp`` over
            them (one primal, K tangents). ``"repeat"`` is the fallback for decoders that vmap
            cannot handle (data-dependent control flow, ``.item()``, unsupported ops): z is
            repeated K times along the batch (B·K rows) and each row gets one tangent, which
            costs K primal rows instead of one but needs nothing beyond ``torch.func.jvp``.
            ``"auto"`` tries vmap on the first call and falls back to repeat if vmap raises.
    """

    def __init__(self, decoder: Callable[[Tensor], Tensor], z: Tensor, *, batching: Batching):
        if batching not in ("auto", "vmap", "repeat"):
            raise ValueError(f"batching must be 'auto', 'vmap' or 'repeat', got {batching!r}")
        self.decoder = decoder
        self.z = z
        self.batching = batching
        self.fallback_reason: str | None = None
        self._z0 = z.detach()
        self._out: Tensor | None = None
        self._vjp_fn: Callable | None = None
        self._vjp_K: int | None = None

    @property
    def out(self) -> Tensor:
        if self._out is None:
            with torch.no_grad():
                self._out = self.decoder(self._z0)
        return self._out

    def _jvp_vmap(self, z: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        def one(v: Tensor) -> tuple[Tensor, Tensor]:
            return _jvp(self.decoder, (z,), (v,))

        out, JV = vmap(one, in_dims=1, out_dims=(None, 1), randomness="same")(V)
        return out, JV

    def _jvp_repeat(self, z: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        B, K, d = V.shape
        zr = z.unsqueeze(1).expand(B, K, d).reshape(B * K, d)
        out, JV = _jvp(self.decoder, (zr,), (V.reshape(B * K, d),))
        return out.reshape(B, K, -1)[:, 0], JV.reshape(B, K, -1)

    def _run(self, vmapped: Callable, repeated: Callable, *args: Tensor):
        if self.batching == "repeat":
            return repeated(*args)
        if self.batching == "vmap":
            return vmapped(*args)
        try:
            result = vmapped(*args)
        except Exception as exc:  # vmap's failures are RuntimeError, NotImplementedError, ...
            self.batching = "repeat"
            self.fallback_reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return repeated(*args)
        self.batching = "vmap"
        return result

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        z = self.z if create_graph else self._z0
        with torch.set_grad_enabled(create_graph):
            out, JV = self._run(self._jvp_vmap, self._jvp_repeat, z, V)
        if self._out is None:
            self._out = out.detach()
        return JV

    def _vjp_vmap(self, W: Tensor) -> Tensor:
        if self._vjp_fn is None or self._vjp_K is not None:
            out, self._vjp_fn = _vjp(self.decoder, self._z0)
            self._vjp_K = None
            if self._out is None:
                self._out = out
        fn = self._vjp_fn
        return vmap(lambda w: fn(w)[0], in_dims=1, out_dims=1)(W)

    def _vjp_repeat(self, W: Tensor) -> Tensor:
        B, K, D = W.shape
        if self._vjp_fn is None or self._vjp_K != K:
            zr = self._z0.unsqueeze(1).expand(B, K, -1).reshape(B * K, -1)
            _, self._vjp_fn = _vjp(self.decoder, zr)
            self._vjp_K = K
        return self._vjp_fn(W.reshape(B * K, D))[0].reshape(B, K, -1)

    def vjp(self, W: Tensor) -> Tensor:
        with torch.no_grad():
            return self._run(self._vjp_vmap, self._vjp_repeat, W)

    def gram_mv(self, V: Tensor) -> tuple[Tensor, Tensor]:
        JV = self.jvp(V)
        return JV, self.vjp(JV)


def linearize(
    decoder: Callable[[Tensor], Tensor], z: Tensor, *, batching: Batching = "auto"
) -> Linearization:
    """Linearize ``decoder`` at ``z``.

    In order: a decoder that knows its own Jacobian structure may provide
    ``decoder.linearize(z)`` returning a :class:`Linearization`; a plain ``nn.Sequential`` MLP
    (Linear layers and common activations) gets the explicit linearization of
    :mod:`rnf_fast.linearize.modules` when ``batching="auto"``; anything else, or an explicit
    ``batching="vmap"`` / ``"repeat"``, takes the generic ``torch.func`` path
    (:class:`FuncLinearization`), which serves any differentiable decoder.

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d) latents.
        batching: ``"auto"``, or force the generic path's tangent batching (see
            :class:`FuncLinearization`).

    Returns:
        A :class:`Linearization` at z.
    """
    own = getattr(decoder, "linearize", None)
    if callable(own):
        lin = own(z)
        if not isinstance(lin, Linearization):
            raise TypeError(
                "decoder.linearize(z) must return an object with z, out, jvp, vjp and gram_mv, "
                f"got {type(lin).__name__}"
            )
        return lin
    if batching == "auto" and supports_sequential(decoder):
        return SequentialLinearization(decoder, z)
    return FuncLinearization(decoder, z, batching=batching)
