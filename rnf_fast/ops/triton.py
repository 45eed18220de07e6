"""The ``"triton"`` backend: the Triton kernels of :mod:`rnf_fast.kernels` on CUDA tensors.

The same op names, signatures and semantics as :mod:`rnf_fast.ops.reference` (the spec). ``gram``
and ``cg_update`` run Triton kernels (float32 and float64, one launch each, no host
synchronisation); the per-system sequential ops (``cholesky_logdet``, ``cholesky_inverse``,
``lanczos_logquad``) are those of :mod:`rnf_fast.ops.cpp`, which runs the compiled CUDA
kernels where ``rnf_fast._C`` was built with CUDA and the reference otherwise. Each op falls
back to the reference where the kernels do not reach: tensors off CUDA, other dtypes, or a
CG state with non-contiguous tensors.

Triton can be off while the backend is selected: a kernel that fails to compile or to build its
launcher warns once, returns the reference's result, and switches Triton off for the process
(:func:`rnf_fast.kernels.run_triton`). The backend then stays usable by name, its ops running
the reference, while ``"auto"`` skips it (:func:`disabled_reason`). ``RNF_FAST_NO_TRITON=1``
makes it unavailable altogether.

Like the ``"cpp"`` backend, :func:`cg_update` updates the state's tensors in place (the
reference rebinds some of them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import (
    run_triton,
    triton_available,
    triton_disabled_reason,
    triton_failure,
    triton_unavailable_reason,
)
from . import reference
from .cpp import cholesky_inverse, cholesky_logdet, lanczos_logquad
from .reference import JITTER_STEPS, CGState, cg_init, lanczos_tridiagonal

__all__ = [
    "CGState",
    "cg_init",
    "cg_update",
    "cholesky_inverse",
    "cholesky_logdet",
    "disabled_reason",
    "gram",
    "JITTER_STEPS",
    "lanczos_logquad",
    "lanczos_tridiagonal",
    "unavailable_reason",
]

_FLOATS = (torch.float32, torch.float64)


def unavailable_reason() -> str | None:
    """Why the backend cannot be used here, or None when it can: Triton installed and not
    switched off by ``RNF_FAST_NO_TRITON=1`` (read at each call), and a CUDA device."""
    reason = triton_disabled_reason()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device: the Triton kernels run on CUDA tensors only"
    return None


def disabled_reason() -> str | None:
    """Why the Triton kernels are off after a compile or launcher failure in this process, or
    None. The ops then run the reference; ``"auto"`` no longer picks this backend."""
    return None if triton_failure() is None else triton_unavailable_reason()


def _on_cuda(*tensors: Tensor) -> bool:
    first = tensors[0]
    return (
        first.device.type == "cuda"
        and first.dtype in _FLOATS
        and all(t.device == first.device for t in tensors)
    )


def gram(J: Tensor) -> Tensor:
    """Compute A = JᵀJ for every sample (one Triton launch on CUDA).

    Arguments:
        J: (B, D, d) Jacobians (any strides).

    Returns:
        (B, d, d) symmetric positive semi-definite Gram matrices.
    """
    if J.dim() != 3 or not _on_cuda(J) or not triton_available():
        return reference.gram(J)
    return run_triton("gram", reference.gram, J)


def cg_update(state: CGState, Ap: Tensor, tol: float) -> Tensor:
    """Advance every active system by one CG step, given A p; update ``state`` in place.

    Same semantics as :func:`rnf_fast.ops.reference.cg_update`, in one fused Triton launch on CUDA.

    Arguments:
        state: the :class:`CGState` to advance (from :func:`cg_init`).
        Ap: (N, d) the operator applied to ``state.p``.
        tol: relative residual tolerance.

    Returns:
        (N,) the step sizes α of this step (0 for inactive systems).
    """
    floats = (state.x, state.r, state.p, state.rr, state.bb, state.alphas, state.betas)
    same = all(t.dtype == state.x.dtype for t in floats)
    tensors = (*floats, state.active, state.breakdown, state.steps, Ap)
    contiguous = all(t.is_contiguous() for t in tensors[:-1])
    if not (same and _on_cuda(*tensors) and contiguous and triton_available()):
        return reference.cg_update(state, Ap, tol)
    # A compile or launcher failure is raised before the kernel writes to the state, so the
    # reference can take this step from the same state.
    return run_triton("cg_update", reference.cg_update, state, Ap, tol)
