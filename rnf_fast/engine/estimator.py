"""What the exact and stochastic estimators share: the call they serve, the estimate they return.

Both build one surrogate (DESIGN.md §2)

    S = c · Σ_k ⟨ stopgrad(J A⁻¹ v_k), J v_k ⟩,     A = JᵀJ,

exact with V = I_d and c = 2, stochastic with K probes (E[v vᵀ] = I) and c = 2/K; the call
returns ``value.detach() + (S - S.detach())``: the value is log det A, the gradient is that of
log det A.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..linearize.base import Batching, Linearization
from ..ops.dispatch import Backend
from .checks import OnSingular
from .precision import accumulate_dtype, lowest_precision

__all__ = ["Context", "Estimate", "tangent_inner"]


@dataclass(frozen=True)
class Context:
    """One log-det call, as the estimators see it.

    Attributes:
        decoder: the decoder (the ``"batch"`` preconditioner linearizes it on a few rows).
        lin: the decoder linearized at z.
        z: (B, d) latents.
        backend: name of the backend of the small ops.
        ops: that backend's module (gram, cholesky_logdet, cholesky_inverse, ...).
        linalg_dtype: dtype of A, its Cholesky factor and the CG state.
        need_grad: build the surrogate (False under ``torch.no_grad()``).
        on_singular: ``"jitter"``, ``"raise"`` or ``"nan"``.
        batching: the tangent batching asked of a generic linearization.
        autocast: the dtype of the caller's autocast where it applies to the decoder's
            products (:meth:`~.precision.CallerAutocast.applies_to`), else None.
    """

    decoder: Callable[[Tensor], Tensor]
    lin: Linearization
    z: Tensor
    backend: str
    ops: Backend
    linalg_dtype: torch.dtype
    need_grad: bool
    on_singular: OnSingular
    batching: Batching
    autocast: torch.dtype | None = None

    def precision(self, *dtypes: torch.dtype) -> torch.dtype:
        """The precision of the decoder's products: the least precise of z's dtype,
        ``dtypes`` (those of the products seen) and the caller's autocast dtype."""
        return lowest_precision(self.z.dtype, *dtypes, self.autocast)


@dataclass(frozen=True)
class Estimate:
    """What an estimator returns besides its own report.

    Attributes:
        value: (B,) log det A or its estimate, in the linalg dtype; NaN where singular or
            unavailable.
        surrogate: (B,) S with its graph, or None when no gradient is needed.
        singular: (B,) samples whose A is not numerically positive definite.
        value_unavailable_reason: why ``value`` is no estimate of log det A (NaN), if so.
    """

    value: Tensor
    surrogate: Tensor | None
    singular: Tensor
    value_unavailable_reason: str | None = None


def tangent_inner(lin: Linearization, V: Tensor, W: Tensor) -> Tensor:
    """Σ_k ⟨w_k, J v_k⟩ per sample, differentiable through J: V (B, K, d), W (B, K, D) -> (B,).

    A linearization that factors J = W₃ M through a final linear layer (``jvp_hidden``) takes
    it in the hidden space as ⟨w_k W₃, M v_k⟩ (W₃ differentiable, w_k not): the same value up
    to rounding, without the tangents' pass through W₃ and with one GEMM less in the backward.
    The products are in the more precise of the two factors' dtypes, summed in float32 at least
    (:func:`~.precision.accumulate_dtype`)."""
    hidden = getattr(lin, "jvp_hidden", None)
    pair = hidden(V) if callable(hidden) else None
    if pair is None:
        WJV = W * lin.jvp(V, create_graph=True)
    else:
        MV, weight = pair
        dtype = torch.promote_types(W.dtype, weight.dtype)
        WJV = (W.to(dtype) @ weight.to(dtype)) * MV
    return WJV.sum((1, 2), dtype=accumulate_dtype(WJV.dtype))
