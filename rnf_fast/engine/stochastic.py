"""The stochastic estimator: Hutchinson probes, batched conjugate gradients, and the stochastic
Lanczos quadrature (SLQ) value of the same CG run.

With probes ε (E[εεᵀ] = I) and an optional split preconditioner M = L Lᵀ, CG solves
Ã y = ε, Ã = L⁻¹ A L⁻ᵀ (Ã = A without one); u = L⁻ᵀ y = A⁻¹ L ε, w = L⁻ᵀ ε, and the surrogate
S = (2/K) Σ_k ⟨stopgrad(J u_k), J w_k⟩ has E[∇S] = ∇ log det A
(:mod:`rnf_fast.engine.precondition`). The value is log det M + mean_k SLQ(Ã, ε_k) from a zero
start; a warm start (y0 = Lᵀ x0) leaves it unavailable (NaN).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..linearize.base import Linearization
from ..ops.reference import lanczos_tridiagonal
from .cg import CGResult, batched_cg
from .checks import (
    check_cg_memory,
    check_jacobian_nonzero,
    check_lin_output,
    report_singular,
    ritz_floor,
    warn_at_caller,
)
from .estimator import Context, Estimate, tangent_inner
from .graph_cg import GraphedCG, ReplayedProduct, requested, solve_graphed
from .options import CG
from .precision import lowest_precision
from .precondition import Preconditioner, build_preconditioner
from .probes import make_probes

__all__ = ["CGInfo", "estimate_cg"]

_WARM_START_NO_VALUE = (
    "warm start: the Lanczos coefficients describe the Krylov space of the initial residual, "
    "not that of the probes, so they give no log det estimate"
)


@dataclass
class CGInfo:
    """The stochastic path's part of :class:`rnf_fast.LogdetInfo`.

    Attributes:
        matvecs: batched JᵀJ products (the slowest system's iterations, plus one for a warm
            start).
        iterations: (B, K) iterations per system.
        residuals: (B, K) final relative residuals ‖r‖/‖ε‖.
        converged: (B, K) whether each system met the tolerance.
        preconditioner: ``"jacobi"``, ``"batch"``, ``"given"`` or None.
        solution: (B, K, d) the solutions u_k = A⁻¹ v_k, v_k = L ε_k (v_k = ε_k without a
            preconditioner), in the linalg dtype: a warm start ``x0`` for a later call with the
            same probes and preconditioner. With a truncation, CG's own (unweighted) iterate.
        truncated_at: the number of iterations a truncation drew (``CG(truncation=...)``), or
            None.
        graph: how the solve ran where a CUDA graph was asked for (``CG(cuda_graph=...)`` or
            ``RNF_FAST_CG_GRAPH=1``): ``"captured"``, ``"replayed"`` or ``"eager: <reason>"``
            (:mod:`rnf_fast.engine.graph_cg`); None where it was not.
    """

    matvecs: int
    iterations: Tensor
    residuals: Tensor
    converged: Tensor
    preconditioner: str | None
    solution: Tensor
    truncated_at: int | None = None
    graph: str | None = None


class _SplitGramProduct:
    """The CG matvec p -> L⁻¹ Jᵀ J L⁻ᵀ p over (N, d) = (B·K, d), and the running image J u of the
    CG iterate, so the detached half of the surrogate costs no extra pass.

    J u_k is accumulated from the J L⁻ᵀ p of each product (J u_{j+1} = J u_j + α_j J L⁻ᵀ p_j,
    :meth:`step`). A linearization with ``gram_mv_hidden`` keeps its products in a narrower space
    H (J = W M, returning M p): then M u is accumulated and lifted to J u once at the end.

    Products in a 16-bit precision (a 16-bit z, or 16-bit autocast) take each direction at unit
    max-norm and scale the results back: CG's late directions are small and fp16's smallest
    normal number is 6e-5. Without it, fp16 decoders run to 3d iterations with full probes
    (tol 0) had products underflow to zero, a breakdown and a NaN value; with it their values
    stayed within 1.4 u κ_F(J) of the float64 truth.
    """

    def __init__(
        self,
        lin: Linearization,
        z: Tensor,
        prec: Preconditioner | None,
        K: int,
        dtype: torch.dtype,
        autocast: torch.dtype | None = None,
    ) -> None:
        self.lin, self.z, self.prec, self.K, self.dtype = lin, z, prec, K, dtype
        self.autocast = autocast
        self.rescale = torch.finfo(lowest_precision(z.dtype, autocast)).bits == 16
        self.last_scale: Tensor | None = None
        self.hidden: Callable[[Tensor], tuple[Tensor, Tensor] | None] | None = getattr(
            lin, "gram_mv_hidden", None
        )
        self.lifted = False
        self.last_image: Tensor | None = None
        self.first_image_zero: Tensor | None = None
        self.image: Tensor | None = None  # allocated by the first step (CG takes at least one)

    def __call__(self, P: Tensor) -> Tensor:
        B, d = self.z.shape
        Q = P.view(B, self.K, d)
        if self.prec is not None:
            Q = self.prec.solve_LT(Q)
        scale = None
        if self.rescale:
            scale = Q.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(Q.dtype).tiny)
            Q = Q / scale
        Q = Q.to(self.z.dtype)
        first = self.last_image is None
        pair = None
        if callable(self.hidden) and (self.lifted or first):
            pair = self.hidden(Q)
        if pair is None:
            pair = self.lin.gram_mv(Q)
        else:
            self.lifted = True
        image, AQ = pair
        if first:
            check_lin_output(self.lin, self.z, self.autocast, finite=False)
            self.first_image_zero = (image == 0).all()
        self.last_image, self.last_scale = image, scale
        AQ = AQ.to(self.dtype) if scale is None else AQ.to(self.dtype) * scale
        return (AQ if self.prec is None else self.prec.solve_L(AQ)).reshape(B * self.K, d)

    def step(self, alpha: Tensor) -> None:
        """Follow the iterate's step x += α p in the image: J u += α (J L⁻ᵀ p), in place in
        the linalg dtype (one buffer for the whole run, the product cast up inside the
        kernel)."""
        B = self.z.shape[0]
        step = alpha.view(B, self.K, 1)
        if self.last_scale is not None:
            step = step * self.last_scale
        if self.image is None:
            self.image = torch.zeros(self.last_image.shape, dtype=self.dtype, device=self.z.device)
        self.image.addcmul_(step, self.last_image)

    def solution_image(self) -> Tensor:
        """J u_k (B, K, D), detached: in the linalg dtype accumulated, rounded once to z's dtype
        (the decoder's, for the lift through its last layer)."""
        image = self.image.to(self.z.dtype)
        return self.lin.lift(image) if self.lifted else image


def _reweighted(step: Callable[[Tensor], None], weights: Tensor, warm: bool):
    """``step`` with the i-th CG step's α scaled by weights[i] (a truncation's 1 / P(J >= i));
    a warm start's first call (the step to x0) keeps weight 1."""
    calls = iter([1.0] * warm + weights.tolist())

    def weighted(alpha: Tensor) -> None:
        step(alpha * next(calls))

    return weighted


def _draw_probes(options: CG, z: Tensor) -> Tensor:
    """The (B, K, d) probes in z's dtype: the given tensor, or drawn."""
    if isinstance(options.probes, Tensor):
        return options.probes.to(z.dtype)
    B, d = z.shape
    return make_probes(
        B,
        options.probes,
        d,
        kind=options.probe_kind,
        generator=options.generator,
        dtype=z.dtype,
        device=z.device,
    )


def _ritz_ratio(res: CGResult) -> Tensor:
    """(N,) θ_min / θ_max, the extreme Lanczos (Ritz) values of each system's CG run (1 for a
    system that took no step). The padding of the Lanczos matrices past a system's end is set
    to its first diagonal entry (a Rayleigh quotient, so inside [θ_min, θ_max]) to leave the
    extremes unchanged."""
    T = lanczos_tridiagonal(res.alphas, res.betas, res.steps)
    M = T.shape[-1]
    if M == 0:
        return torch.ones_like(res.bb)
    pad = torch.arange(M, device=T.device)[None, :] >= res.steps[:, None]
    T = T + torch.diag_embed(torch.where(pad, T[:, :1, 0] - 1.0, 0.0))
    theta = torch.linalg.eigvalsh(T)
    return theta[:, 0] / theta[:, -1]


def _singular_systems(res: CGResult, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The systems with a sign of a numerically singular A, (N,) bool each: (broken: a
    breakdown pᵀAp <= 0, NaN value; other: a Ritz ratio θ_min / θ_max below
    :func:`~rnf_fast.engine.checks.ritz_floor` of the products' dtype). A system still above
    the tolerance after d steps is no sign: float32 products lose CG's orthogonality on
    well-posed but ill-conditioned systems (the 16 samples of the MNIST-sized flow, κ(A) about
    10³, exact path: none singular, left 8 systems above tol 1e-2 after d = 20 steps); it gets
    the max_iter warning instead."""
    return res.breakdown, _ritz_ratio(res) < ritz_floor(dtype)


def _check_jacobian_nonzero(
    product: _SplitGramProduct | ReplayedProduct, lin: Linearization, z: Tensor
) -> None:
    """J = 0 at every sample is an error. The first products J p are all zero then; only in that
    case are the d basis directions pushed to tell it from probes that J happens to annihilate."""
    if product.first_image_zero is None or not bool(product.first_image_zero):
        return
    B, d = z.shape
    basis = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)
    check_jacobian_nonzero(not bool(lin.jvp(basis).any()))


def _solve(
    lin: Linearization,
    z: Tensor,
    prec: Preconditioner | None,
    b: Tensor,
    y0: Tensor | None,
    *,
    K: int,
    dtype: torch.dtype,
    autocast: torch.dtype | None,
    tol: float,
    max_iter: int,
    backend: str,
) -> tuple[CGResult, _SplitGramProduct]:
    """The fixed-iteration solve with its running image J u: what a CUDA graph captures."""
    product = _SplitGramProduct(lin, z, prec, K, dtype, autocast)
    res = batched_cg(
        product,
        b,
        tol=tol,
        max_iter=max_iter,
        fixed_iterations=True,
        backend=backend,
        on_step=product.step,
        x0=y0,
    )
    return res, product


def _solve_graphed(
    options: CG,
    ctx: Context,
    prec: Preconditioner | None,
    b: Tensor,
    y0: Tensor | None,
    K: int,
    max_iter: int,
) -> GraphedCG | None:
    """The solve through a CUDA graph (:mod:`.graph_cg`) where the call asks for one, else
    None; a :class:`GraphedCG` without a result where the graph cannot serve the call."""
    if not requested(options.cuda_graph, ctx.z):
        return None
    solve = functools.partial(
        _solve,
        K=K,
        dtype=ctx.linalg_dtype,
        autocast=ctx.autocast,
        tol=float(options.tol),
        max_iter=max_iter,
        backend=ctx.backend,
    )
    return solve_graphed(
        solve,
        ctx.lin,
        ctx.z,
        prec,
        b,
        y0,
        settings=tuple(solve.keywords.items()),
        autocast=ctx.autocast,
        truncation=options.truncation is not None,
    )


def estimate_cg(options: CG, ctx: Context) -> tuple[Estimate, CGInfo]:
    """The SLQ estimate of log det A per sample and the stochastic surrogate S.

    A sample is reported singular (per ``ctx.on_singular``) when one of its systems breaks down
    (its value is then NaN) or has a Ritz ratio at the rounding floor of the products' dtype
    (its value is then NaN with ``"nan"`` only).

    Arguments:
        options: the CG options (probes, tolerance, preconditioner, warm start, ...).
        ctx: the call (linearization, z (B, d), backend, linalg dtype, ...).

    Returns:
        (the :class:`Estimate`, the :class:`CGInfo`).
    """
    lin, z, ldtype = ctx.lin, ctx.z, ctx.linalg_dtype
    B, d = z.shape
    check_cg_memory(options, z, ldtype)
    probes = _draw_probes(options, z)
    K = probes.shape[1]
    prec = None
    if options.preconditioner is not None:
        prec = build_preconditioner(
            options.preconditioner, ctx.decoder, lin, z, dtype=ldtype, batching=ctx.batching
        )
    eps = probes.to(ldtype)
    product = _SplitGramProduct(lin, z, prec, K, ldtype, ctx.autocast)
    y0 = None
    if options.x0 is not None:
        x0 = options.x0.to(ldtype)
        y0 = (x0 if prec is None else prec.apply_LT(x0)).reshape(B * K, d)
    max_iter = cap = d if options.max_iter is None else options.max_iter
    on_step, truncated_at = product.step, None
    if options.truncation is not None:
        truncated_at, weights = options.truncation.draw(max_iter, options.generator)
        max_iter, on_step = truncated_at, _reweighted(product.step, weights, y0 is not None)
    b = eps.reshape(B * K, d)
    graphed = _solve_graphed(options, ctx, prec, b, y0, K, max_iter)
    if graphed is not None and graphed.result is not None:
        res, product = graphed.result, graphed.product
    else:
        res = batched_cg(
            product,
            b,
            tol=float(options.tol),
            max_iter=max_iter,
            fixed_iterations=options.fixed_iterations,
            backend=ctx.backend,
            on_step=on_step,
            x0=y0,
        )
    out_dtype = check_lin_output(lin, z, ctx.autocast)
    _check_jacobian_nonzero(product, lin, z)
    # The products' precision: z's dtype, the output's and the caller's autocast dtype.
    precision = ctx.precision(out_dtype, product.last_image.dtype)
    Y = res.x.view(B, K, d)
    info = CGInfo(
        matvecs=res.matvecs,
        iterations=res.steps.view(B, K),
        residuals=res.residuals.view(B, K),
        converged=res.converged.view(B, K),
        preconditioner=None if prec is None else prec.kind,
        solution=Y if prec is None else prec.solve_LT(Y),
        truncated_at=truncated_at,
        graph=None if graphed is None else graphed.status,
    )
    broken, other = _singular_systems(res, precision)
    reason = None
    if res.warm_start:
        quad = torch.full((B, K), float("nan"), dtype=ldtype, device=z.device)
        reason = _WARM_START_NO_VALUE
        broken = broken.view(B, K).any(1)
    else:
        quad = res.logquad().view(B, K)
        # Breakdown (pᵀAp <= 0) or a Lanczos matrix with a non-positive eigenvalue (NaN
        # quadrature): A is not positive definite on the Krylov space; nothing can be trusted.
        broken = (broken.view(B, K) | ~torch.isfinite(quad)).any(1)
    singular = broken | other.view(B, K).any(1)
    nan = singular if ctx.on_singular == "nan" else broken
    report_singular(singular, ctx.on_singular, "CG", dtype=precision, nan=nan)
    # A truncation that stopped before the cap stopped on purpose (its reweighting removes the
    # bias); one that reached the cap is biased like plain CG there.
    cut = truncated_at is not None and truncated_at < cap
    if not cut and not bool((info.converged | singular[:, None]).all()):
        warn_at_caller(
            "CG reached max_iter before the tolerance for some systems; the gradient estimate "
            "is biased there (see LogdetInfo.cg.residuals with return_info=True)"
        )
    value = quad.mean(1)
    if prec is not None:
        value = value + prec.logdet.to(ldtype)
    value = torch.where(nan, torch.full_like(value, float("nan")), value)
    if not ctx.need_grad:
        return Estimate(value, None, singular, reason), info
    w = probes if prec is None else prec.solve_LT(eps).to(z.dtype)
    S = (2.0 / K) * tangent_inner(lin, w, product.solution_image())
    return Estimate(value, S, singular, reason), info
