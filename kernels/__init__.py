"""Triton kernels of rnf_fast, shipped as ``rnf_fast.kernels``.

Each kernel module (``linear``, ``coupling``, ``gram``, ``cg``) holds the Triton kernel and its
launcher, and imports Triton; this package imports them only when a kernel runs, so
``import rnf_fast.kernels`` works without Triton. The plain-PyTorch reference of each kernel
has the same name (:mod:`rnf_fast.kernels.reference`, and :mod:`rnf_fast.reference` for
``gram`` and ``cg_update``).

The functions below are what the linearizations call: the Triton kernel for float32 CUDA
tensors when Triton is installed and no autograd graph is being recorded through them, the
reference otherwise (CPU, other dtypes, or inputs that need a gradient: the kernels have no
backward). :func:`triton_available` says whether Triton can be imported here.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from . import reference

__all__ = [
    "coupling_cotangent",
    "coupling_tangent",
    "scaled_linear",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _use_triton(*tensors: Tensor | None) -> bool:
    """Run the kernel: float32 tensors on one CUDA device, Triton present, no graph needed."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    if first.device.type != "cuda" or not triton_available():
        return False
    if any(t.dtype != torch.float32 or t.device != first.device for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def scaled_linear(
    X: Tensor, W: Tensor, S: Tensor | None = None, *, transpose: bool = False
) -> Tensor:
    """Tangents through a linear layer and a diagonal scale: Y = (X Wᵀ) ⊙ S, or with
    ``transpose=True`` the cotangents Y = (X ⊙ S) W. S is broadcast over the K tangents.

    Arguments:
        X: (B, K, n_in) tangents (``transpose=True``: (B, K, n_out) cotangents).
        W: (n_out, n_in) the layer's weight.
        S: (B, n_out) per-sample scale (an activation's derivative σ'(a)), or None.
        transpose: apply the transposed map.

    Returns:
        (B, K, n_out) (``transpose=True``: (B, K, n_in)).

    Example:
        >>> X, W, S = torch.randn(2, 3, 4), torch.randn(5, 4), torch.rand(2, 5)
        >>> scaled_linear(X, W, S).shape
        torch.Size([2, 3, 5])
    """
    if _use_triton(X, W, S):
        from . import linear

        return linear.scaled_linear(X, W, S, transpose=transpose)
    return reference.scaled_linear(X, W, S, transpose=transpose)


def coupling_tangent(dx_t: Tensor, dtheta: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> Tensor:
    """Tangents of a coupling layer's transformed half: ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p.

    Arguments:
        dx_t: (B, K, m) tangents of the transformed inputs.
        dtheta: (B, K, m, P) tangents of the transform's parameters.
        dy_dx: (B, m) cached ∂y/∂x.
        dy_dtheta: (B, m, P) cached ∂y/∂θ.

    Returns:
        (B, K, m) tangents of the outputs.
    """
    if _use_triton(dx_t, dtheta, dy_dx, dy_dtheta):
        from . import coupling

        return coupling.coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta)
    return reference.coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta)


def coupling_cotangent(dy_t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> tuple[Tensor, Tensor]:
    """Cotangents of a coupling layer's transformed half: x̄ = ∂y/∂x ⊙ ȳ, θ̄_p = ∂y/∂θ_p ⊙ ȳ.

    Arguments:
        dy_t: (B, K, m) cotangents of the outputs.
        dy_dx: (B, m) cached ∂y/∂x.
        dy_dtheta: (B, m, P) cached ∂y/∂θ.

    Returns:
        (B, K, m) cotangents of the inputs and (B, K, m, P) of the parameters.
    """
    if _use_triton(dy_t, dy_dx, dy_dtheta):
        from . import coupling

        return coupling.coupling_cotangent(dy_t, dy_dx, dy_dtheta)
    return reference.coupling_cotangent(dy_t, dy_dx, dy_dtheta)
