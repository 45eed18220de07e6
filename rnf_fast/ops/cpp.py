"""The ``"cpp"`` backend: the engine's per-system ops compiled in ``rnf_fast._C`` (``csrc/``).

The same op names, signatures and semantics as :mod:`rnf_fast.ops.reference` (the spec), run by
C++ kernels on CPU (threads over systems) and CUDA kernels when the extension was built with
CUDA. Each call falls back to the reference where the kernels do not reach: no extension,
dtypes other than float32/float64, mixed dtypes or devices, other devices, d (Cholesky) or M
(Lanczos steps) above ``_C.MAX_DIM`` = 64, more than ``_C.MAX_JITTER_STEPS`` jitters, or a
non-contiguous CG state. The module holds only the compiled ops; for the others (``gram``,
``cg_init``, ``lanczos_tridiagonal``, the matvec ops) :mod:`rnf_fast.ops.dispatch` gives the
reference's.

``RNF_FAST_NO_CUDA_EXT=1`` in the environment (read at each call) switches the CUDA kernels
off: ops on CUDA tensors then run the reference, and the CPU kernels are unaffected
(:func:`cuda_unavailable_reason` says why CUDA tensors do not reach the kernels).

Deliberate differences from the reference: a Lanczos tridiagonal with NaN or Inf entries gives
a NaN estimate (the reference's ``eigh`` may raise for the whole batch); :func:`cholesky_inverse`
of a factor with a zero pivot gives Inf/NaN entries for that system (the reference raises for
the whole batch); :func:`cg_update` updates the state's tensors in place (the reference rebinds
some of them).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from . import reference
from .reference import JITTER_STEPS, CGState

try:
    from .. import _C
except ImportError as exc:
    _C = None
    _IMPORT_ERROR: str | None = str(exc)
else:
    _IMPORT_ERROR = None

__all__ = [
    "cg_update",
    "cholesky_logdet",
    "cholesky_inverse",
    "cuda_unavailable_reason",
    "lanczos_logquad",
    "NO_CUDA_EXT_ENV",
    "unavailable_reason",
]

NO_CUDA_EXT_ENV = "RNF_FAST_NO_CUDA_EXT"  # "1": CUDA tensors run the reference (read per call)
_FLOATS = (torch.float32, torch.float64)


def unavailable_reason() -> str | None:
    """Why the compiled extension cannot be used, or None when it can."""
    if _C is not None:
        return None
    if importlib.util.find_spec("rnf_fast._C") is None:
        return (
            "the extension rnf_fast._C is not built; reinstall with a C++ compiler and without "
            "RNF_FAST_NO_EXTENSION=1 (pip install --no-build-isolation .)"
        )
    return (
        f"the extension rnf_fast._C does not import ({_IMPORT_ERROR}); rebuild it against the "
        "installed torch (pip install --no-build-isolation .)"
    )


def cuda_unavailable_reason() -> str | None:
    """Why ops on CUDA tensors run the reference rather than the extension's CUDA kernels, or
    None when they run the kernels (the extension imports, was built with CUDA, and
    ``RNF_FAST_NO_CUDA_EXT=1`` is not set)."""
    if _C is None:
        return unavailable_reason()
    if not _C.WITH_CUDA:
        return (
            "rnf_fast._C was built without CUDA; reinstall with a CUDA build of torch and the "
            "CUDA toolchain (CUDA_HOME)"
        )
    if os.environ.get(NO_CUDA_EXT_ENV, "0") == "1":
        return f"disabled by {NO_CUDA_EXT_ENV}=1"
    return None


def _covers(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors: one float dtype and one device they serve."""
    if _C is None:
        return False
    first = tensors[0]
    if first.dtype not in _FLOATS or not all(
        t.dtype == first.dtype and t.device == first.device for t in tensors
    ):
        return False
    return first.device.type == "cpu" or (
        first.device.type == "cuda" and cuda_unavailable_reason() is None
    )


def _square_batch(M: Tensor) -> bool:
    """(..., d, d) with 1 <= d <= MAX_DIM: the shapes the matrix kernels take."""
    return M.dim() >= 2 and M.shape[-1] == M.shape[-2] and 0 < M.shape[-1] <= _C.MAX_DIM


def cg_update(state: CGState, Ap: Tensor, tol: float) -> Tensor:
    """Advance every active system by one CG step, given A p; update ``state`` in place.

    Same semantics as :func:`rnf_fast.ops.reference.cg_update`, in one fused kernel: per-system
    stop on ‖r‖ <= tol · ‖b‖, breakdown on pᵀAp <= 0 (or NaN), inactive systems frozen, column
    ``state.it`` of ``state.alphas`` / ``state.betas`` written. Unlike the reference, the
    state's tensors are updated in place rather than replaced.

    Arguments:
        state: the :class:`~rnf_fast.ops.reference.CGState` to advance (from ``cg_init``).
        Ap: (N, d) the operator applied to ``state.p``.
        tol: relative residual tolerance.

    Returns:
        (N,) the step sizes α of this step (0 for inactive systems).
    """
    floats = (state.x, state.r, state.p, state.rr, state.bb, state.alphas, state.betas)
    if not _covers(*floats) or not all(t.is_contiguous() for t in floats):
        return reference.cg_update(state, Ap, tol)
    alpha = _C.cg_update(
        state.x,
        state.r,
        state.p,
        state.rr,
        state.bb,
        state.active,
        state.breakdown,
        state.steps,
        state.alphas,
        state.betas,
        Ap.to(state.p.dtype).contiguous(),
        state.it,
        float(tol),
    )
    state.it += 1
    return alpha


def lanczos_logquad(alphas: Tensor, betas: Tensor, steps: Tensor, bb: Tensor) -> Tensor:
    """Stochastic Lanczos quadrature of bᵀ log(A) b from the coefficients of zero-start CG on b.

    Same semantics as :func:`rnf_fast.ops.reference.lanczos_logquad`; the M×M eigen-solve is an
    implicit QL on the first ``steps`` rows only, tracking the first eigenvector components.

    Arguments:
        alphas, betas: (N, M) CG coefficients.
        steps: (N,) steps each system ran (rows past it are ignored).
        bb: (N,) squared norms ‖b‖².

    Returns:
        (N,) quadrature estimates (NaN where T has a non-positive eigenvalue, or non-finite
        entries).
    """
    if not _covers(alphas, betas, bb) or alphas.dim() != 2 or alphas.shape[1] > _C.MAX_DIM:
        return reference.lanczos_logquad(alphas, betas, steps, bb)
    return _C.lanczos_logquad(
        alphas.contiguous(), betas.contiguous(), steps.long().contiguous(), bb.contiguous()
    )


def cholesky_logdet(
    A: Tensor, *, jitter_steps: tuple[float, ...] = JITTER_STEPS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cholesky factor and log det of many small SPD matrices, with bounded jitter.

    Same semantics as :func:`rnf_fast.ops.reference.cholesky_logdet` (the lower triangle of A is
    read; failed systems retry with ``s · eps · |tr A| / d`` added to the diagonal for each
    ``s`` of ``jitter_steps``). Where ``info > 0`` the factor is partial and not meaningful.

    Arguments:
        A: (..., d, d) symmetric matrices.
        jitter_steps: increasing jitters to try after a failed factorisation, in units of
            eps · tr(A) / d; empty for no jitter.

    Returns:
        L: (..., d, d) lower Cholesky factors (of A + jitter·I).
        logdet: (...,) log det(A + jitter·I), NaN where the factorisation failed.
        jitter: (...,) absolute jitter added (0 where none was needed).
        info: (...,) int32, 0 on success, else the order of the first leading minor of
            A + jitter·I that is not positive definite.
    """
    if not _covers(A) or not _square_batch(A) or len(jitter_steps) > _C.MAX_JITTER_STEPS:
        return reference.cholesky_logdet(A, jitter_steps=jitter_steps)
    batch, d = A.shape[:-2], A.shape[-1]
    L, logdet, jitter, info = _C.cholesky_logdet(
        A.reshape(-1, d, d).contiguous(), [float(s) for s in jitter_steps]
    )
    return L.view(A.shape), logdet.view(batch), jitter.view(batch), info.view(batch)


def cholesky_inverse(L: Tensor) -> Tensor:
    """A⁻¹ from the Cholesky factor of A = L Lᵀ (lower triangle of L read).

    Arguments:
        L: (..., d, d) lower Cholesky factors.

    Returns:
        (..., d, d) symmetric inverses.
    """
    if not _covers(L) or not _square_batch(L):
        return reference.cholesky_inverse(L)
    d = L.shape[-1]
    return _C.cholesky_inverse(L.reshape(-1, d, d).contiguous()).view(L.shape)
