"""Batched conjugate gradients over many small SPD systems, with Lanczos bookkeeping.

One call solves A_i x_i = b_i for N systems at once, where ``matvec`` applies every A_i in one
batched product. Each system stops on its own relative residual; the CG coefficients double as
the Lanczos tridiagonal of the zero-start Krylov space, from which stochastic Lanczos quadrature
estimates bᵀ log(A) b with no extra products.

A warm start x0 runs CG from zero on the correction system A e = r0 = b - A x0 and returns
x = x0 + e. Its coefficients describe the Krylov space of (A, r0), not of (A, b), so they give
no quadrature of bᵀ log(A) b: :meth:`CGResult.logquad` refuses a warm-started result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.dispatch import Backend, get_backend

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
        alphas, betas: (N, iterations) CG coefficients, zero past each system's end.
        bb: (N,) ‖b‖².
        warm_start: started from a nonzero x0 (the coefficients then describe the Krylov space
            of the initial residual, and :meth:`logquad` is unavailable).
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
    ops: Backend
    warm_start: bool = False

    def logquad(self) -> Tensor:
        """Stochastic Lanczos quadrature of bᵀ log(A) b per system, (N,).

        Raises:
            ValueError: the run was warm-started (its coefficients do not describe the
                zero-start Krylov space of b).
        """
        if self.warm_start:
            raise ValueError(
                "a warm-started CG run gives no Lanczos quadrature of bᵀ log(A) b: its "
                "coefficients describe the Krylov space of the initial residual b - A x0"
            )
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
    x0: Tensor | None = None,
) -> CGResult:
    """Solve A_i x_i = b_i for N systems by conjugate gradients, no graph.

    From x = 0 by default. With a warm start ``x0`` one extra product gives r0 = b - A x0, CG
    runs from zero on A e = r0 with the stopping rule still relative to b
    (‖r0 - A e‖ = ‖b - A x‖ <= tol · ‖b‖), and x = x0 + e.

    With ``fixed_iterations`` the loop performs no host synchronisation: every step is a
    fixed sequence of tensor operations (converged systems are frozen by masks inside the
    update), so it can be captured in a CUDA graph.

    Arguments:
        matvec: maps P (N, d) to (A_i p_i)_i, (N, d), in b's dtype.
        b: (N, d) right-hand sides; the solver runs in b's dtype.
        tol: per-system relative residual tolerance, ‖r_i‖ <= tol · ‖b_i‖.
        max_iter: iteration cap (the warm start's product is not counted).
        fixed_iterations: always run max_iter iterations (no host synchronisation).
        backend: backend of the fused update (see :mod:`rnf_fast.ops.dispatch`).
        on_step: called after each update with the (N,) step sizes α, so a caller can track a
            linear image of x (x_{j+1} = x_j + α_j p_j) alongside. With ``x0`` it is first
            called with α = 1 right after ``matvec(x0)``: the step from 0 to x0 along p = x0.
        x0: (N, d) initial guess, or None for zero.

    Returns:
        A :class:`CGResult` (``matvecs`` counts the warm start's product).
    """
    _, ops = get_backend(backend, b.device)
    with torch.no_grad():
        if x0 is None:
            state = ops.cg_init(b, max_iter)
        else:
            r0 = b - matvec(x0)
            if on_step is not None:
                on_step(torch.ones(b.shape[0], dtype=b.dtype, device=b.device))
            state = ops.cg_init(r0, max_iter)
            # The stopping rule compares rᵀr with tol² · state.bb: keep it relative to b, and
            # systems whose x0 already meets it take no step.
            state.bb = (b * b).sum(-1)
            state.active = state.active & (state.rr > (tol * tol) * state.bb)
        # A warm start that already meets the tolerance everywhere needs no step at all.
        done = x0 is not None and not fixed_iterations and not bool(state.active.any())
        for _ in range(0 if done else max_iter):
            alpha = ops.cg_update(state, matvec(state.p), tol)
            if on_step is not None:
                on_step(alpha)
            if not fixed_iterations and not bool(state.active.any()):
                break
    tiny = torch.finfo(b.dtype).tiny
    residuals = torch.sqrt(state.rr / state.bb.clamp_min(tiny))
    x = state.x if x0 is None else x0 + state.x
    return CGResult(
        x=x,
        steps=state.steps,
        residuals=residuals,
        converged=(residuals <= tol) & ~state.breakdown,
        breakdown=state.breakdown,
        matvecs=state.it + (x0 is not None),
        alphas=state.alphas[:, : state.it],
        betas=state.betas[:, : state.it],
        bb=state.bb,
        ops=ops,
        warm_start=x0 is not None,
    )
