"""Preconditioners M = L Lᵀ of A = JᵀJ for the stochastic log-det estimator (split form).

With M = L Lᵀ symmetric positive definite (held fixed: no gradient flows through it), a probe
ε with E[εεᵀ] = I and v = L ε, CG solves the split system from zero

    Ã y = ε,    Ã = L⁻¹ A L⁻ᵀ      (matvec p -> L⁻¹ Jᵀ J L⁻ᵀ p),

and gives u = L⁻ᵀ y = A⁻¹ v and w = L⁻ᵀ ε = M⁻¹ v. Since E[w uᵀ] = L⁻ᵀ E[εεᵀ] Lᵀ A⁻¹ = A⁻¹,

    S = (2/K) Σ_k ⟨ stopgrad(J u_k), J w_k ⟩

has E[∇S] = 2 tr(A⁻¹ Jᵀ ∂J) = ∇ log det A, and

    log det A = log det M + log det Ã = log det M + E[εᵀ log(Ã) ε],

where the Lanczos coefficients of the split run are exactly those of (Ã, ε): the stochastic
Lanczos quadrature stays a correct value. CG's iterations follow the spectrum of Ã, so a
good M (close to A up to a scalar) cuts them.

Sources of M:

- ``"jacobi"``: M = diag(A), A_ii = ‖J e_i‖², from d extra tangents per sample (no cotangents).
- ``"batch"``: one M for the whole batch, the mean Gram matrix of its first
  :data:`BATCH_PRECONDITIONER_ROWS` rows, from d tangents on those rows only: it removes the
  anisotropy that the samples share.
- a tensor: M given by the caller (for instance a running mean of A over earlier steps),
  (d, d) or (B, d, d) SPD, or (d,) or (B, d) positive diagonal (a 2-D (d, d) tensor is read as
  a shared matrix, also when B == d).

Measured (bench/results/precond.md, tol 1e-2, batched matvecs = the slowest system's
iterations): on the trained digits flow (d = 10, well conditioned) ``"jacobi"`` cuts the
matvecs from 8.25 to 6.0 (K = 1) and 9.0 to 6.5 (K = 4), which repays its B·d tangent rows
from K = 4 on; the previous batch's mean JᵀJ cuts them to 7.25 at no cost; ``"batch"`` saves
nothing there. On the ill-conditioned standard MLP at d = 128, ``"batch"`` cuts them from 73
to 41 for 4·d rows (``"jacobi"``: 66). No preconditioner is the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..linearize.base import Batching, Linearization, linearize

__all__ = [
    "BATCH_PRECONDITIONER_ROWS",
    "PRECONDITIONERS",
    "Preconditioner",
    "build_preconditioner",
    "check_preconditioner",
]

PRECONDITIONERS = ("jacobi", "batch")

BATCH_PRECONDITIONER_ROWS = 4
"""Rows whose mean Gram matrix is the ``"batch"`` preconditioner: it costs 4·d tangent rows
(and a 4-row primal), against 2·B·K rows for each CG iteration it saves."""


@dataclass
class Preconditioner:
    """M = L Lᵀ per sample (or one for all samples), in the solver's dtype.

    Attributes:
        L: (B or 1, d, d) lower-triangular factor, or (B or 1, d) for a diagonal L.
        inv_L: L⁻¹, same shape as ``L``.
        logdet: (B or 1,) log det M = 2 Σ log diag L.
        kind: ``"jacobi"``, ``"batch"`` or ``"given"``.
    """

    L: Tensor
    inv_L: Tensor
    logdet: Tensor
    kind: str

    @property
    def diagonal(self) -> bool:
        return self.L.dim() == 2

    def solve_L(self, P: Tensor) -> Tensor:
        """L⁻¹ p_k per sample: P (B, K, d) -> (B, K, d)."""
        if self.diagonal:
            return P * self.inv_L[:, None, :]
        return P @ self.inv_L.transpose(-1, -2)

    def solve_LT(self, P: Tensor) -> Tensor:
        """L⁻ᵀ p_k per sample: P (B, K, d) -> (B, K, d)."""
        if self.diagonal:
            return P * self.inv_L[:, None, :]
        return P @ self.inv_L

    def apply_LT(self, U: Tensor) -> Tensor:
        """Lᵀ u_k per sample: U (B, K, d) -> (B, K, d)."""
        if self.diagonal:
            return U * self.L[:, None, :]
        return U @ self.L


def check_preconditioner(
    preconditioner: object, B: int | None = None, d: int | None = None
) -> None:
    """Validate the ``preconditioner`` option of :func:`rnf_fast.logdet_grad`: its kind, and
    the shape of a tensor when B and d are given.

    Arguments:
        preconditioner: None, a name of :data:`PRECONDITIONERS`, or a floating-point tensor M
            of shape (d, d), (B, d, d), (d,) or (B, d).
        B, d: batch size and latent dimension, or None to check the kind only.
    """
    if preconditioner is None:
        return
    if isinstance(preconditioner, str):
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(
                f"preconditioner must be None, one of {PRECONDITIONERS} or a tensor, "
                f"got {preconditioner!r}"
            )
        return
    if not isinstance(preconditioner, Tensor):
        raise TypeError(
            f"preconditioner must be None, one of {PRECONDITIONERS} or a tensor, got "
            f"{type(preconditioner).__name__}"
        )
    if B is not None and d is not None:
        shapes = ((d, d), (B, d, d), (d,), (B, d))
        if tuple(preconditioner.shape) not in shapes:
            raise ValueError(
                f"preconditioner tensor must be (d, d) = ({d}, {d}), (B, d, d) = "
                f"({B}, {d}, {d}), (d,) = ({d},) or (B, d) = ({B}, {d}), got "
                f"{tuple(preconditioner.shape)}"
            )
    if not preconditioner.is_floating_point():
        raise TypeError(
            f"preconditioner must be a floating-point tensor, got {preconditioner.dtype}"
        )


def _from_matrix(M: Tensor, kind: str) -> Preconditioner:
    """Factor an SPD M (n, d, d) or a positive diagonal (n, d)."""
    if M.dim() == 2:
        if not bool((M > 0).all()) or not bool(torch.isfinite(M).all()):
            raise ValueError("preconditioner diagonal must be finite and positive")
        L = M.sqrt()
        return Preconditioner(L, 1.0 / L, M.log().sum(-1), kind)
    if not torch.allclose(M, M.transpose(-1, -2), rtol=1e-6, atol=0.0):
        raise ValueError("preconditioner matrix must be symmetric")
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info > 0).any()) or not bool(torch.isfinite(L).all()):
        raise ValueError("preconditioner matrix must be positive definite")
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
    inv_L = torch.linalg.solve_triangular(L, eye, upper=False)
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
    return Preconditioner(L, inv_L, logdet, kind)


def _gram_of_rows(lin: Linearization, n: int, d: int, dtype: torch.dtype) -> Tensor:
    """(n, d, d) exact Gram matrices from d tangents per row, no graph."""
    basis = torch.eye(d, dtype=lin.z.dtype, device=lin.z.device).expand(n, d, d)
    JT = lin.jvp(basis).to(dtype)  # (n, d, D): JT[:, k] = J e_k
    return JT @ JT.transpose(1, 2)


def build_preconditioner(
    preconditioner: str | Tensor,
    decoder: Callable[[Tensor], Tensor],
    lin: Linearization,
    z: Tensor,
    *,
    dtype: torch.dtype,
    batching: Batching,
) -> Preconditioner:
    """Build M = L Lᵀ (detached) from its name or a given tensor (see the module docstring).

    Arguments:
        preconditioner: ``"jacobi"``, ``"batch"``, or a tensor checked by
            :func:`check_preconditioner`.
        decoder: the decoder (``"batch"`` linearizes it on a few rows).
        lin: the decoder linearized at z (``"jacobi"`` pushes d tangents through it).
        z: (B, d) latents.
        dtype: the solver's dtype.
        batching: tangent batching of a generic linearization.

    Returns:
        A :class:`Preconditioner` with leading dimension B, or 1 when shared by all samples.
    """
    B, d = z.shape
    with torch.no_grad():
        if isinstance(preconditioner, Tensor):
            M = preconditioner.detach().to(device=z.device, dtype=dtype)
            # A 2-D (d, d) tensor is a shared matrix (even when B == d).
            if M.dim() == 1 or (M.dim() == 2 and M.shape == (d, d)):
                M = M.unsqueeze(0)
            return _from_matrix(M, "given")
        if preconditioner == "jacobi":
            basis = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)
            diag = (lin.jvp(basis).to(dtype) ** 2).sum(-1)
            # A zero column of J (A singular) is left for CG to report: floor it, do not fail.
            floor = torch.finfo(dtype).eps * diag.mean(-1, keepdim=True)
            return _from_matrix(
                torch.maximum(diag, floor.clamp_min(torch.finfo(dtype).tiny)), "jacobi"
            )
        rows = min(B, BATCH_PRECONDITIONER_ROWS)
        sub = linearize(decoder, z[:rows].detach(), batching=batching)
        M = _gram_of_rows(sub, rows, d, dtype).mean(0, keepdim=True)
        return _from_matrix(M, "batch")
