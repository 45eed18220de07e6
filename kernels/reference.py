"""Plain-PyTorch references of the kernels of :mod:`rnf_fast.kernels`, one per kernel, same
name and signature: the spec of each kernel and its fallback off the GPU.

``gram`` and ``cg_update`` are engine ops; their references are in :mod:`rnf_fast.ops.reference`.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["coupling_cotangent", "coupling_tangent", "scaled_linear"]


def scaled_linear(X: Tensor, W: Tensor, S: Tensor | None, *, transpose: bool = False) -> Tensor:
    """Y = (X Wᵀ) ⊙ S, or with ``transpose=True`` Y = (X ⊙ S) W; S broadcast over K.

    Arguments:
        X: (B, K, n_in) tangents (``transpose=True``: (B, K, n_out) cotangents).
        W: (n_out, n_in) weight.
        S: (B, n_out) per-sample scale, or None.
        transpose: apply the transposed map.

    Returns:
        (B, K, n_out) (``transpose=True``: (B, K, n_in)).
    """
    if transpose:
        return (X if S is None else X * S.unsqueeze(1)) @ W
    Y = X @ W.T
    return Y if S is None else Y * S.unsqueeze(1)


def coupling_tangent(dx_t: Tensor, dtheta: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> Tensor:
    """ẏ = ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p.

    Arguments:
        dx_t: (B, K, m); dtheta: (B, K, m, P); dy_dx: (B, m); dy_dtheta: (B, m, P).

    Returns:
        (B, K, m).
    """
    return dy_dx.unsqueeze(1) * dx_t + (dy_dtheta.unsqueeze(1) * dtheta).sum(-1)


def coupling_cotangent(dy_t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> tuple[Tensor, Tensor]:
    """x̄ = ∂y/∂x ⊙ ȳ and θ̄_p = ∂y/∂θ_p ⊙ ȳ.

    Arguments:
        dy_t: (B, K, m); dy_dx: (B, m); dy_dtheta: (B, m, P).

    Returns:
        (B, K, m) and (B, K, m, P).
    """
    return dy_dx.unsqueeze(1) * dy_t, dy_dtheta.unsqueeze(1) * dy_t.unsqueeze(-1)
