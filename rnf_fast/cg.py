"""Batched conjugate gradients over many small SPD systems, with Lanczos bookkeeping.

One call solves A_i x_i = b_i for N systems at once, where ``matvec`` applies every A_i in one
batched product. Each system stops on its own relative residual; the CG coefficients double as
the Lanczos tridiagonal of the zero-start Krylov space, from which stochastic Lanczos quadrature
estimates bᵀ log(A) b with no extra products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .backends import get_backend

__all__ = ["CGResult", "batched_cg"]


@dataclass
class CGResult:
    """Outcome of :func:`batched_cg` for N systems.

    Attributes:
        x: (N, d) solutions.
        steps: (N,) iterations each system ran.
        residuals: (N,) final relative residuals ‖b - A x‖ / ‖b‖ (as tracked by the recurrence).
        converged: (N,) met the tolerance.
        breakdown: (N,) met pᵀAp <= 0: A is not numerically positive definite.
        matvecs: batched products performed.
        alphas, betas: (N, matvecs) CG coefficients, zero past each system's end.
        bb: (N,) ‖b‖².
    """

    x: Tensor
    steps: Tensor
    residuals: Tensor
    converged: Tensor
    breakdown: Tensor
    matvecs: int
    alphas: Tensor
    betas: Tensor
    bb: Tensor
    ops: ModuleType

    def logquad(self) -> Tensor:
        """Stochastic Lanczos quadrature of bᵀ log(A) b per system, (N,)."""
        return self.ops.lanczos_logquad(self.alphas, self.betas, self.steps, self.bb)


def batched_cg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    tol: float,
    max_iter: int,
    fixed_iterations: bool = False,
    backend: str | None = None,
    on_step: Callable[[Tensor], None] | None = None,
) -> CGResult:
    """Solve A_i x_i = b_i for N systems by conjugate gradients from x = 0, no graph.

    Arguments:
        matvec: maps P (N, d) to (A_i p_i)_i, (N, d), in b's dtype.
        b: (N, d) right-hand sides; the solver runs in b's dtype.
        tol: per-system relative residual tolerance, ‖r_i‖ <= tol · ‖b_i‖.
        max_iter: iteration cap.
        fixed_iterations: always run max_iter iterations (no host synchronisation).
        backend: backend of the fused update (see :mod:`rnf_fast.backends`).
        on_step: called after each update with the (N,) step sizes α, so a caller can track a
            linear image of x (x_{j+1} = x_j + α_j p_j) alongside.

    Returns:
        A :class:`CGResult`.
    """
    _, ops = get_backend(backend, b.device)
    state = ops.cg_init(b, max_iter)
    with torch.no_grad():
        for _ in range(max_iter):
            alpha = ops.cg_update(state, matvec(state.p), tol)
            if on_step is not None:
                on_step(alpha)
            if not fixed_iterations and not bool(state.active.any()):
                break
    tiny = torch.finfo(b.dtype).tiny
    residuals = torch.sqrt(state.rr / state.bb.clamp_min(tiny))
    return CGResult(
        x=state.x,
        steps=state.steps,
        residuals=residuals,
        converged=(residuals <= tol) & ~state.breakdown,
        breakdown=state.breakdown,
        matvecs=state.it,
        alphas=state.alphas[:, : state.it],
        betas=state.betas[:, : state.it],
        bb=state.bb,
        ops=ops,
    )
