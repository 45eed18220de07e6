"""The decoder linearized at z: J v, Jᵀ w and Jᵀ(J v), batched over probes.

:class:`Linearization` is the seam between the estimators and whatever computes Jacobian
products: a subclass gives ``z``, ``out``, ``jvp`` and ``vjp`` and inherits ``gram_mv``; the
optional capabilities the engine uses where present (``gram``, ``gram_mv_hidden``, ``lift``)
are declared here as None. :func:`linearize` picks the linearization of a decoder: its own, the
explicit one of :mod:`.modules` for an ``nn.Sequential`` MLP, else the ``torch.func`` fallback of
:mod:`.generic`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Literal

from torch import Tensor

__all__ = ["Batching", "Linearization", "Path", "linearize"]

Batching = Literal["auto", "vmap", "repeat"]
Path = Literal["explicit", "generic"]

_PATHS = ("explicit", "generic")
_REQUIRED = ("z", "out", "jvp", "vjp", "gram_mv")


class Linearization(ABC):
    """A decoder linearized at z (B samples, latent dim d, ambient dim D).

    A subclass sets ``z`` and ``out`` and implements :meth:`jvp` and :meth:`vjp`; :meth:`gram_mv`
    follows. An object of another class with ``z``, ``out``, ``jvp``, ``vjp`` and ``gram_mv``
    also serves (``isinstance`` accepts it), with the capabilities below absent.

    Attributes:
        z: (B, d) the point, as given (it may require grad).
        out: (B, D) the decoder's output at z, detached.
        path: how the estimators cost the products: ``"explicit"`` (cached factors, no primal
            recompute, as the library's explicit linearizations) or ``"generic"`` (the cost of
            ``torch.func``). Declared by each class; ``"generic"`` unless it says otherwise.
        batching: what ``LogdetInfo.batching`` reports; the class name unless the class sets it.
        fallback_reason: why a slower way was taken (vmap failed, a layer without a rule), or
            None.
        gram: optional ``gram(*, create_graph) -> (B, d, d) | None``, A = JᵀJ without J where
            that is cheaper (None from the call where it is not).
        gram_mv_hidden: optional ``gram_mv_hidden(V) -> (H, AV) | None``, the CG product in a
            hidden space of width n, with ``lift(H) -> J v`` (B, K, n) -> (B, K, D).
        lift: see ``gram_mv_hidden``.
        jvp_hidden: optional ``jvp_hidden(V) -> (M v, W) | None``, the differentiable J v
            factored as J = W M through a final linear layer W (D, n): M v (B, K, n) with its
            graph and W itself, for inner products ⟨c, J v⟩ = ⟨c W, M v⟩ in the hidden space.
        output: (B, D) the decoder's output at z with its graph, where the linearization ran
            the decoder with grad enabled (else None): a caller that needs decoder(z) as well
            (a reconstruction loss) can use it instead of running the decoder again.

    Example:
        >>> import torch
        >>> class Linear(Linearization):
        ...     path = "explicit"
        ...
        ...     def __init__(self, weight, z):
        ...         self.weight, self.z, self.out = weight, z, z.detach() @ weight.T
        ...
        ...     def jvp(self, V, *, create_graph=False):
        ...         return V @ self.weight.T
        ...
        ...     def vjp(self, C):
        ...         return C @ self.weight
        >>> lin = Linear(torch.randn(5, 2), torch.randn(3, 2))
        >>> JV, AV = lin.gram_mv(torch.randn(3, 4, 2))
        >>> JV.shape, AV.shape, lin.gram is None
        (torch.Size([3, 4, 5]), torch.Size([3, 4, 2]), True)
    """

    z: Tensor
    out: Tensor
    path: Path = "generic"
    batching: str | None = None
    fallback_reason: str | None = None
    gram: Callable[..., Tensor | None] | None = None
    gram_mv_hidden: Callable[[Tensor], tuple[Tensor, Tensor] | None] | None = None
    lift: Callable[[Tensor], Tensor] | None = None
    jvp_hidden: Callable[[Tensor], tuple[Tensor, Tensor] | None] | None = None
    output: Tensor | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.path not in _PATHS:
            raise TypeError(
                f"{cls.__name__}.path must be 'explicit' or 'generic', got {cls.path!r}"
            )
        if cls.batching is None:
            cls.batching = cls.__name__

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is Linearization and all(
            callable(getattr(other, name, None)) for name in ("jvp", "vjp", "gram_mv")
        ):
            return True
        return NotImplemented

    @abstractmethod
    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        """J v_k per sample: V (B, K, d) -> (B, K, D). With ``create_graph`` the result is
        differentiable with respect to z and the decoder's parameters."""

    @abstractmethod
    def vjp(self, C: Tensor) -> Tensor:
        """Jᵀ c_k per sample, no graph: C (B, K, D) -> (B, K, d)."""

    def gram_mv(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """(J v_k, Jᵀ J v_k) per sample, no graph: V (B, K, d) -> ((B, K, D), (B, K, d))."""
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
    (:class:`~rnf_fast.linearize.generic.FuncLinearization`), which serves any differentiable
    decoder.

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d) latents.
        batching: ``"auto"``, or force the generic path's tangent batching (see
            :class:`~rnf_fast.linearize.generic.FuncLinearization`).

    Returns:
        A :class:`Linearization` at z.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> mlp = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 5))
        >>> lin = linearize(mlp, torch.randn(3, 2))
        >>> lin.path, lin.jvp(torch.randn(3, 4, 2)).shape
        ('explicit', torch.Size([3, 4, 5]))
    """
    # The linearizations subclass Linearization, so they are imported here, not at the top.
    from .generic import FuncLinearization
    from .modules import SequentialLinearization, supports_sequential

    own = getattr(decoder, "linearize", None)
    if callable(own):
        lin = own(z)
        subclass = Linearization in type(lin).__mro__
        if not (
            subclass or isinstance(lin, Linearization) and all(hasattr(lin, n) for n in _REQUIRED)
        ):
            raise TypeError(
                "decoder.linearize(z) must return a Linearization (an object with z, out, jvp, "
                f"vjp and gram_mv), got {type(lin).__name__}"
            )
        return lin
    if batching == "auto" and supports_sequential(decoder):
        return SequentialLinearization(decoder, z)
    return FuncLinearization(decoder, z, batching=batching)
