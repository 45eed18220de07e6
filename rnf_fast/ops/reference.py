"""Plain-PyTorch versions of every op: the spec and the fallback.

Every op here has one name that the backends (:mod:`rnf_fast.ops.cpp` over the compiled
extension ``rnf_fast._C``, :mod:`rnf_fast.ops.triton` over the Triton kernels of
:mod:`rnf_fast.kernels`) implement with the same signature and semantics where they implement
it at all; :mod:`rnf_fast.ops.dispatch` picks the backend per call and falls back to this module
for every op a backend lacks. This module always imports.

Ops of the linearizations' tangent and cotangent passes:
    scaled_linear(X, W, S)          (X Wᵀ) ⊙ S for many tangents, or its transpose.
    coupling_tangent(...)           Tangents of a coupling layer's transformed half.
    coupling_cotangent(...)         Cotangents of the same.

Ops of the log-det engine:
    gram(J)                         A = JᵀJ per sample.
    cholesky_logdet(A, ...)         Batched Cholesky with bounded jitter, log det A.
    cholesky_inverse(L)             A⁻¹ from the Cholesky factor.
    cg_init(b, max_iter)            The zero-start CG state (:class:`CGState`).
    cg_update(state, Ap, tol)       One fused conjugate-gradient step for many systems.
    lanczos_tridiagonal(...)        The Lanczos matrices that CG's coefficients imply.
    lanczos_logquad(...)            Stochastic Lanczos quadrature of vᵀ log(A) v.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = [
    "CGState",
    "cg_init",
    "cg_update",
    "cholesky_logdet",
    "cholesky_inverse",
    "coupling_cotangent",
    "coupling_tangent",
    "gram",
    "JITTER_STEPS",
    "lanczos_logquad",
    "lanczos_tridiagonal",
    "scaled_linear",
]


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
        >>> scaled_linear(torch.randn(2, 3, 5), W, S, transpose=True).shape
        torch.Size([2, 3, 4])
    """
    if transpose:
        return (X if S is None else X * S.unsqueeze(1)) @ W
    Y = X @ W.T
    return Y if S is None else Y * S.unsqueeze(1)


def coupling_tangent(dx_t: Tensor, dtheta: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> Tensor:
    """Tangents of a coupling layer's transformed half: ẏ = ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p.

    Arguments:
        dx_t: (B, K, m) tangents of the transformed inputs x.
        dtheta: (B, K, m, P) tangents of the transform's parameters θ.
        dy_dx: (B, m) cached ∂y/∂x, broadcast over K.
        dy_dtheta: (B, m, P) cached ∂y/∂θ, broadcast over K.

    Returns:
        (B, K, m) tangents of the outputs y.
    """
    return dy_dx.unsqueeze(1) * dx_t + (dy_dtheta.unsqueeze(1) * dtheta).sum(-1)


def coupling_cotangent(dy_t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> tuple[Tensor, Tensor]:
    """Cotangents of a coupling layer's transformed half: x̄ = ∂y/∂x ⊙ ȳ, θ̄_p = ∂y/∂θ_p ⊙ ȳ.

    Arguments:
        dy_t: (B, K, m) cotangents of the outputs y.
        dy_dx: (B, m) cached ∂y/∂x, broadcast over K.
        dy_dtheta: (B, m, P) cached ∂y/∂θ, broadcast over K.

    Returns:
        (B, K, m) cotangents of x and (B, K, m, P) of θ.
    """
    return dy_dx.unsqueeze(1) * dy_t, dy_dtheta.unsqueeze(1) * dy_t.unsqueeze(-1)


def gram(J: Tensor) -> Tensor:
    """Compute A = JᵀJ for every sample.

    Arguments:
        J: (B, D, d) Jacobians.

    Returns:
        (B, d, d) symmetric positive semi-definite Gram matrices.
    """
    return J.transpose(-1, -2) @ J


JITTER_STEPS = (1e1, 1e2, 1e3)
"""Jitters tried after a failed Cholesky, in units of eps(dtype) · tr(A) / d."""


def cholesky_logdet(
    A: Tensor, *, jitter_steps: tuple[float, ...] = JITTER_STEPS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cholesky factor and log det of many small SPD matrices, with bounded jitter.

    A system whose factorisation fails is retried with ``s · eps · (tr A / d) · I`` added, for
    each ``s`` of ``jitter_steps`` in turn (eps of A's dtype); there is no unbounded retry loop.
    Systems that still fail keep ``info > 0`` and a NaN log det; the caller reports them.

    Arguments:
        A: (B, d, d) symmetric matrices.
        jitter_steps: increasing jitters to try after a failed factorisation, in units of
            eps · tr(A) / d; empty for no jitter.

    Returns:
        L: (B, d, d) lower Cholesky factors (of A + jitter·I).
        logdet: (B,) log det(A + jitter·I), NaN where the factorisation failed.
        jitter: (B,) absolute jitter added (0 where none was needed).
        info: (B,) int, 0 on success, > 0 where A is not numerically positive definite.
    """
    L, info = torch.linalg.cholesky_ex(A)
    jitter = torch.zeros(A.shape[:-2], dtype=A.dtype, device=A.device)
    failed = info > 0
    if bool(failed.any()):
        d = A.shape[-1]
        scale = torch.finfo(A.dtype).eps * torch.diagonal(A, dim1=-2, dim2=-1).sum(-1).abs() / d
        eye = torch.eye(d, dtype=A.dtype, device=A.device)
        for eps in jitter_steps:
            idx = failed.nonzero().squeeze(-1)
            if idx.numel() == 0:
                break
            added = eps * scale[idx]
            L_try, info_try = torch.linalg.cholesky_ex(A[idx] + added[:, None, None] * eye)
            ok = info_try == 0
            L[idx[ok]] = L_try[ok]
            jitter[idx[ok]] = added[ok]
            info[idx] = info_try
            failed = info > 0
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    logdet = torch.where(info > 0, torch.full_like(logdet, float("nan")), logdet)
    return L, logdet, jitter, info


def cholesky_inverse(L: Tensor) -> Tensor:
    """A⁻¹ from the Cholesky factor of A = L Lᵀ.

    Arguments:
        L: (B, d, d) lower Cholesky factors.

    Returns:
        (B, d, d) symmetric inverses.
    """
    return torch.cholesky_inverse(L)


@dataclass
class CGState:
    """State of batched conjugate gradients over N independent systems of size d.

    All tensors live in the solver's dtype. Lanczos coefficients are written into the
    preallocated (N, max_iter) buffers ``alphas`` and ``betas`` (zero past a system's end).
    """

    x: Tensor  # (N, d) current solution
    r: Tensor  # (N, d) residual b - A x
    p: Tensor  # (N, d) search direction
    rr: Tensor  # (N,) rᵀr
    bb: Tensor  # (N,) bᵀb, for the relative stopping rule
    active: Tensor  # (N,) bool, still iterating
    breakdown: Tensor  # (N,) bool, pᵀAp <= 0 was met (A not numerically SPD)
    steps: Tensor  # (N,) int64, iterations performed
    alphas: Tensor  # (N, max_iter)
    betas: Tensor  # (N, max_iter)
    it: int = 0

    def clone(self) -> CGState:
        """A copy whose tensors are copies: advancing it leaves this state as it is."""
        tensors = {f.name: getattr(self, f.name).clone() for f in fields(self) if f.name != "it"}
        return CGState(**tensors, it=self.it)


def cg_init(b: Tensor, max_iter: int) -> CGState:
    """Start CG from the zero guess for the systems A x = b.

    Arguments:
        b: (N, d) right-hand sides.
        max_iter: iteration cap (the size of the Lanczos buffers).

    Returns:
        The initial :class:`CGState`.
    """
    N = b.shape[0]
    rr = (b * b).sum(-1)
    zeros = b.new_zeros(N, max_iter)
    return CGState(
        x=torch.zeros_like(b),
        r=b.clone(),
        p=b.clone(),
        rr=rr,
        bb=rr.clone(),
        active=rr > 0,
        breakdown=torch.zeros(N, dtype=torch.bool, device=b.device),
        steps=torch.zeros(N, dtype=torch.long, device=b.device),
        alphas=zeros,
        betas=zeros.clone(),
    )


def cg_update(state: CGState, Ap: Tensor, tol: float) -> Tensor:
    """Advance every active system by one CG step, given A p; update ``state`` in place.

    The stopping rule is per system: a system stops once ‖r‖ <= tol · ‖b‖, or when pᵀAp <= 0
    (breakdown: A is not numerically positive definite for it). Inactive systems are frozen.

    Arguments:
        state: the :class:`CGState` to advance.
        Ap: (N, d) the operator applied to ``state.p``.
        tol: relative residual tolerance.

    Returns:
        (N,) the step sizes α of this step (0 for inactive systems), so that callers tracking
        a linear image of x (for instance J x) can update it alongside.
    """
    active = state.active
    pAp = (state.p * Ap).sum(-1)
    ok = active & (pAp > 0)
    state.breakdown |= active & ~(pAp > 0)
    alpha = torch.where(ok, state.rr / torch.where(ok, pAp, torch.ones_like(pAp)), 0.0)
    state.x.addcmul_(alpha[:, None], state.p)
    state.r.addcmul_(alpha[:, None], Ap, value=-1.0)
    rr_new = torch.where(ok, (state.r * state.r).sum(-1), state.rr)
    beta = torch.where(ok, rr_new / torch.where(ok, state.rr, torch.ones_like(rr_new)), 0.0)
    state.alphas[:, state.it] = alpha
    state.betas[:, state.it] = beta
    state.steps += ok.long()
    still = ok & (rr_new > (tol * tol) * state.bb)
    state.p = torch.where(still[:, None], state.r + beta[:, None] * state.p, state.p)
    state.rr = rr_new
    state.active = still
    state.it += 1
    return alpha


def lanczos_tridiagonal(alphas: Tensor, betas: Tensor, steps: Tensor) -> Tensor:
    """Build the Lanczos tridiagonal matrices that zero-start CG implies.

    For a system that ran m steps with coefficients α_j, β_j:
    T[0,0] = 1/α_0, T[j,j] = 1/α_j + β_{j-1}/α_{j-1}, T[j,j+1] = T[j+1,j] = √β_j / α_j
    (j < m-1). Rows past m are padded with an identity block decoupled from the first m, so
    they carry no weight in the quadrature.

    Arguments:
        alphas: (N, M) CG step sizes (0 past each system's end).
        betas: (N, M) CG direction coefficients.
        steps: (N,) number of steps each system ran (<= M).

    Returns:
        (N, M, M) symmetric tridiagonal matrices.
    """
    N, M = alphas.shape
    j = torch.arange(M, device=alphas.device)
    live = j[None, :] < steps[:, None]
    safe_a = torch.where(live, alphas, torch.ones_like(alphas))
    inv_a = torch.where(live, 1.0 / safe_a, torch.zeros_like(alphas))
    diag = inv_a.clone()
    diag[:, 1:] += torch.where(live[:, 1:], betas[:, :-1] * inv_a[:, :-1], 0.0)
    diag = torch.where(live, diag, torch.ones_like(diag))
    off_live = j[None, :-1] + 1 < steps[:, None]
    off = torch.where(off_live, torch.sqrt(betas[:, :-1].clamp_min(0)) * inv_a[:, :-1], 0.0)
    T = torch.diag_embed(diag)
    T = T + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    return T


def lanczos_logquad(alphas: Tensor, betas: Tensor, steps: Tensor, bb: Tensor) -> Tensor:
    """Stochastic Lanczos quadrature of bᵀ log(A) b from the coefficients of zero-start CG on b.

    With T = Q Θ Qᵀ the Lanczos matrix and τ = Q[0, :], bᵀ log(A) b ≈ ‖b‖² Σ_i τ_i² log θ_i,
    exact once CG has run to the full Krylov space.

    Arguments:
        alphas, betas: (N, M) CG coefficients.
        steps: (N,) steps each system ran.
        bb: (N,) squared norms ‖b‖².

    Returns:
        (N,) quadrature estimates (NaN where T has a non-positive eigenvalue).
    """
    T = lanczos_tridiagonal(alphas, betas, steps)
    theta, Q = torch.linalg.eigh(T)
    tau2 = Q[:, 0, :] ** 2
    logs = torch.where(theta > 0, torch.log(theta.clamp_min(torch.finfo(T.dtype).tiny)), torch.nan)
    logs = torch.where(tau2 > 0, logs, torch.zeros_like(logs))
    return bb * (tau2 * logs).sum(-1)
