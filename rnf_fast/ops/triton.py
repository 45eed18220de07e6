"""The ``"triton"`` backend: the Triton kernels of :mod:`rnf_fast.kernels` on CUDA tensors.

Its ops have the names, signatures and semantics of :mod:`rnf_fast.ops.reference` (the spec):
``scaled_linear``, ``coupling_tangent`` and ``coupling_cotangent`` (float32, no autograd graph
recorded through them: the kernels have no backward), ``gram`` and ``cg_update`` (float32 and
float64, one launch each, no host synchronisation). Each runs the reference where the kernel
does not reach: tensors off CUDA, other dtypes, a CG state with non-contiguous tensors, Triton
not usable. The ops this module lacks (Cholesky, Lanczos) are those of the ``"cpp"`` backend,
the base that :mod:`rnf_fast.ops.dispatch` gives this one.

When Triton does not run:

- ``RNF_FAST_NO_TRITON=1`` in the environment switches every Triton path off; the backend is
  then unavailable by name. It is read at each call, not at import.
- A kernel that fails to compile or to build its launcher (Triton compiles each kernel and a
  small C launcher at first use: that needs a C compiler and the Python headers), or a Triton
  that does not import, makes :func:`run_triton` warn once (:class:`TritonFallbackWarning`),
  return the reference's result, and keep Triton off for the rest of the process
  (:func:`triton_failure` gives the cause). The backend then stays usable by name, its ops
  running the reference, while ``"auto"`` skips it (:func:`disabled_reason`). An asynchronous
  CUDA fault (an illegal memory access, say) leaves the device unusable: it is raised, never
  hidden behind a fallback.

Like the ``"cpp"`` backend, :func:`cg_update` updates the state's tensors in place (the
reference rebinds some of them).

Speed switches, each read at every call and off by default until a GPU measurement shows it
wins (``bench/gpu_bench.py``'s kernels section times each both ways); on CPU tensors none is
read:

- ``RNF_FAST_TRITON_PRECISION=tf32x3``: the float32 products of ``scaled_linear`` and ``gram``
  on tensor cores (three TF32 products each) instead of IEEE FMA
  (:mod:`rnf_fast.kernels.tuning`).
- ``RNF_FAST_TRITON_AUTOTUNE=1``: ``scaled_linear`` and ``gram`` time a few tile configurations
  on the first call per shape and keep the fastest.
- ``RNF_FAST_GRAM_CUBLAS_MIN_D=n``: a float64 ``gram`` with d >= n runs as one cuBLAS batched
  GEMM (:func:`gram_uses_cublas`), where the H200's float64 tensor cores serve it, instead of
  the Triton kernel's FMA outer products.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import subprocess
import threading
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

from . import reference
from .frames import stacklevel_outside_ops
from .reference import CGState

__all__ = [
    "GRAM_CUBLAS_ENV",
    "NO_TRITON_ENV",
    "TritonFallbackWarning",
    "cg_update",
    "coupling_cotangent",
    "coupling_tangent",
    "disabled_reason",
    "gram",
    "gram_cublas",
    "gram_uses_cublas",
    "launch_cg_update",
    "run_triton",
    "scaled_linear",
    "triton_available",
    "triton_disabled_reason",
    "triton_failure",
    "triton_unavailable_reason",
    "unavailable_reason",
]

NO_TRITON_ENV = "RNF_FAST_NO_TRITON"  # "1": no Triton anywhere (read at each call)
GRAM_CUBLAS_ENV = "RNF_FAST_GRAM_CUBLAS_MIN_D"  # float64 gram on cuBLAS from this d (each call)

# The kernel module holding each op's launcher (same name as the op).
_KERNEL_MODULES = {
    "scaled_linear": "linear",
    "coupling_tangent": "coupling",
    "coupling_cotangent": "coupling",
    "gram": "gram",
    "cg_update": "cg",
}
_FLOATS = (torch.float32, torch.float64)
# Messages of asynchronous CUDA faults: the context is unusable after them, so no fallback.
_CUDA_FAULT = re.compile(
    r"CUDA error|Triton Error \[CUDA\]|illegal memory access|device-side assert|"
    r"unspecified launch failure|misaligned address"
)
_T = TypeVar("_T")
_lock = threading.Lock()
_failure: str | None = None  # the first compile/launcher failure of this process


class TritonFallbackWarning(RuntimeWarning):
    """A Triton kernel failed to compile or launch; the PyTorch reference runs instead."""


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_disabled_reason() -> str | None:
    """Why Triton is off by configuration: not installed, or switched off by
    ``RNF_FAST_NO_TRITON=1`` (read at each call); None when neither (a failure at run time is
    :func:`triton_failure`)."""
    if not _triton_installed():
        return "Triton is not installed (pip install triton)"
    if os.environ.get(NO_TRITON_ENV, "0") == "1":
        return f"disabled by {NO_TRITON_ENV}=1"
    return None


def triton_failure() -> str | None:
    """The compile or launcher failure that switched Triton off in this process
    (``"<op>: <exception type>: <message>"``), or None when there was none."""
    return _failure


def triton_unavailable_reason() -> str | None:
    """Why the ops run the reference even on CUDA tensors they take, or None when Triton is
    usable: :func:`triton_disabled_reason`, else a recorded :func:`triton_failure`."""
    reason = triton_disabled_reason()
    if reason is None and _failure is not None:
        reason = f"disabled in this process after a failure in {_failure}"
    return reason


def triton_available() -> bool:
    """Whether the Triton kernels can run here (installed, not switched off, no failure yet).

    Says nothing of the device: the kernels run on CUDA tensors only.
    """
    return triton_unavailable_reason() is None


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
    return None if _failure is None else triton_unavailable_reason()


def _on_cuda(*tensors: Tensor) -> bool:
    """Whether the tensors are all on one CUDA device."""
    first = tensors[0]
    return first.device.type == "cuda" and all(t.device == first.device for t in tensors)


def _matvec_takes(*tensors: Tensor | None) -> bool:
    """The matvec kernels' inputs: float32 on one CUDA device, no graph recorded through them."""
    present = [t for t in tensors if t is not None]
    if not _on_cuda(*present) or any(t.dtype != torch.float32 for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def launch_cg_update(state: CGState, Ap: Tensor, tol: float) -> Tensor:
    """Advance ``state`` by one CG step with the Triton kernel (no fallback), in place.

    The kernel's launcher takes the state's tensors; this passes them and advances
    ``state.it``. Arguments and result as :func:`cg_update`; the state's tensors must be
    contiguous, of one float dtype (the flags bool, the step counts int64), on one device.
    """
    from ..kernels.cg import cg_update as launch

    s = state
    alpha = launch(
        s.x, s.r, s.p, s.rr, s.bb, s.active, s.breakdown, s.steps, s.alphas, s.betas, Ap, s.it, tol
    )
    state.it += 1
    return alpha


def _kernel(op: str) -> Callable:
    """The Triton launcher of ``op`` (importing its module imports Triton)."""
    if op == "cg_update":
        return launch_cg_update
    return getattr(importlib.import_module(f"rnf_fast.kernels.{_KERNEL_MODULES[op]}"), op)


def _cuda_fault(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)  # recent torch only
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and _CUDA_FAULT.search(str(exc)) is not None


def _build_failure(exc: BaseException) -> bool:
    """A failure to import Triton, compile a kernel or build its launcher (not a bad argument,
    not an out-of-memory: those are raised as they are)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    if isinstance(exc, (ImportError, OSError, subprocess.CalledProcessError, RuntimeError)):
        return True
    return any(c.__module__.split(".")[0] == "triton" for c in type(exc).__mro__)


def _record_failure(op: str, exc: BaseException) -> None:
    """Keep the first failure's cause and warn, once per process."""
    global _failure
    lines = str(exc).strip().splitlines()
    message = lines[0][:300].rstrip(".") if lines else ""
    cause = f"{op}: {type(exc).__name__}: {message}"
    with _lock:
        if _failure is not None:
            return
        _failure = cause
    warnings.warn(
        f"Triton failed in {cause}; the PyTorch reference runs instead and Triton stays off for "
        "the rest of this process. Triton compiles each kernel and a small C launcher at first "
        "use, which needs a C compiler (on PATH, or named by CC) and the Python development "
        f"headers; set {NO_TRITON_ENV}=1 to skip Triton altogether",
        TritonFallbackWarning,
        stacklevel=stacklevel_outside_ops(),
    )


def run_triton(op: str, fallback: Callable[..., _T], *args: object, **kwargs: object) -> _T:
    """Run the Triton kernel ``op`` on the arguments, or the fallback where Triton fails.

    A failure to import Triton, compile the kernel or build its launcher happens before the
    kernel writes anything; it is recorded (:func:`triton_failure`), warned about once
    (:class:`TritonFallbackWarning`), switches Triton off for the process, and the call returns
    ``fallback(*args, **kwargs)``. An asynchronous CUDA fault, an out-of-memory, or an error
    about the arguments is raised as it is.

    Arguments:
        op: the kernel's name: ``"scaled_linear"``, ``"coupling_tangent"``,
            ``"coupling_cotangent"``, ``"gram"`` or ``"cg_update"``.
        fallback: the reference with the same signature.
        args, kwargs: the op's arguments (shapes as in its reference's docstring).

    Returns:
        What the kernel (or else the fallback) returns.
    """
    if op not in _KERNEL_MODULES:
        raise ValueError(f"op must be one of {sorted(_KERNEL_MODULES)}, got {op!r}")
    try:
        return _kernel(op)(*args, **kwargs)
    except Exception as exc:
        if _cuda_fault(exc) or not _build_failure(exc):
            raise
        _record_failure(op, exc)
    return fallback(*args, **kwargs)


def scaled_linear(
    X: Tensor, W: Tensor, S: Tensor | None = None, *, transpose: bool = False
) -> Tensor:
    """Y = (X Wᵀ) ⊙ S, or with ``transpose=True`` Y = (X ⊙ S) W, S broadcast over the K
    tangents: :func:`rnf_fast.ops.reference.scaled_linear`, one Triton GEMM on float32 CUDA
    tensors.

    Arguments:
        X: (B, K, n_in) tangents (``transpose=True``: (B, K, n_out) cotangents).
        W: (n_out, n_in) the layer's weight.
        S: (B, n_out) per-sample scale, or None.
        transpose: apply the transposed map.

    Returns:
        (B, K, n_out) (``transpose=True``: (B, K, n_in)).
    """
    if not (_matvec_takes(X, W, S) and triton_available()):
        return reference.scaled_linear(X, W, S, transpose=transpose)
    return run_triton("scaled_linear", reference.scaled_linear, X, W, S, transpose=transpose)


def coupling_tangent(dx_t: Tensor, dtheta: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> Tensor:
    """Tangents of a coupling layer's transformed half, ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p:
    :func:`rnf_fast.ops.reference.coupling_tangent`, one Triton launch on float32 CUDA tensors.

    Arguments:
        dx_t: (B, K, m) tangents of the transformed inputs.
        dtheta: (B, K, m, P) tangents of the transform's parameters.
        dy_dx: (B, m) cached ∂y/∂x.
        dy_dtheta: (B, m, P) cached ∂y/∂θ.

    Returns:
        (B, K, m) tangents of the outputs.
    """
    args = (dx_t, dtheta, dy_dx, dy_dtheta)
    if not (_matvec_takes(*args) and triton_available()):
        return reference.coupling_tangent(*args)
    return run_triton("coupling_tangent", reference.coupling_tangent, *args)


def coupling_cotangent(dy_t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor) -> tuple[Tensor, Tensor]:
    """Cotangents of a coupling layer's transformed half, x̄ = ∂y/∂x ⊙ ȳ and θ̄_p = ∂y/∂θ_p ⊙ ȳ:
    :func:`rnf_fast.ops.reference.coupling_cotangent`, one Triton launch on float32 CUDA
    tensors.

    Arguments:
        dy_t: (B, K, m) cotangents of the outputs.
        dy_dx: (B, m) cached ∂y/∂x.
        dy_dtheta: (B, m, P) cached ∂y/∂θ.

    Returns:
        (B, K, m) cotangents of the inputs and (B, K, m, P) of the parameters.
    """
    args = (dy_t, dy_dx, dy_dtheta)
    if not (_matvec_takes(*args) and triton_available()):
        return reference.coupling_cotangent(*args)
    return run_triton("coupling_cotangent", reference.coupling_cotangent, *args)


def gram_uses_cublas(dtype: torch.dtype, d: int, min_d: str | None) -> bool:
    """Whether ``gram`` of a (B, D, d) CUDA tensor of ``dtype`` runs on cuBLAS, given the value
    of ``RNF_FAST_GRAM_CUBLAS_MIN_D`` (None or empty: never): float64 with d >= that value.

    Raises:
        ValueError: ``min_d`` is not a non-negative integer (the message names the variable).

    Example:
        >>> gram_uses_cublas(torch.float64, 64, "32"), gram_uses_cublas(torch.float64, 16, "32")
        (True, False)
        >>> gram_uses_cublas(torch.float32, 64, "0"), gram_uses_cublas(torch.float64, 64, None)
        (False, False)
    """
    if not min_d:
        return False
    try:
        threshold = int(min_d)
    except ValueError:
        threshold = -1
    if threshold < 0:
        raise ValueError(
            f"{GRAM_CUBLAS_ENV} must be a non-negative integer (the smallest d whose float64 "
            f"gram runs on cuBLAS; unset: never), got {min_d!r}"
        )
    return dtype == torch.float64 and d >= threshold


def gram_cublas(J: Tensor) -> Tensor:
    """A = JᵀJ for every sample as one batched GEMM (cuBLAS on CUDA), made exactly symmetric.

    Arguments:
        J: (B, D, d) Jacobians (any strides).

    Returns:
        (B, d, d) symmetric Gram matrices (contiguous).
    """
    A = torch.bmm(J.transpose(1, 2), J)
    # A GEMM need not round A[i, j] and A[j, i] alike; the op promises a symmetric A.
    return (A + A.transpose(1, 2)).mul_(0.5)


def gram(J: Tensor) -> Tensor:
    """Compute A = JᵀJ for every sample (one Triton launch on CUDA; float64 from
    ``RNF_FAST_GRAM_CUBLAS_MIN_D`` up: :func:`gram_cublas`).

    Arguments:
        J: (B, D, d) Jacobians (any strides).

    Returns:
        (B, d, d) symmetric positive semi-definite Gram matrices.
    """
    takes = J.dim() == 3 and J.dtype in _FLOATS and _on_cuda(J)
    if takes and gram_uses_cublas(J.dtype, J.shape[2], os.environ.get(GRAM_CUBLAS_ENV)):
        return gram_cublas(J)
    if not (takes and triton_available()):
        return reference.gram(J)
    return run_triton("gram", reference.gram, J)


def cg_update(state: CGState, Ap: Tensor, tol: float) -> Tensor:
    """Advance every active system by one CG step, given A p; update ``state`` in place.

    Same semantics as :func:`rnf_fast.ops.reference.cg_update`, in one fused Triton launch on
    CUDA (:func:`launch_cg_update`).

    Arguments:
        state: the :class:`~rnf_fast.ops.reference.CGState` to advance (from ``cg_init``).
        Ap: (N, d) the operator applied to ``state.p``.
        tol: relative residual tolerance.

    Returns:
        (N,) the step sizes α of this step (0 for inactive systems).
    """
    floats = (state.x, state.r, state.p, state.rr, state.bb, state.alphas, state.betas)
    same = state.x.dtype in _FLOATS and all(t.dtype == state.x.dtype for t in floats)
    tensors = (*floats, state.active, state.breakdown, state.steps, Ap)
    contiguous = all(t.is_contiguous() for t in tensors[:-1])
    if not (same and _on_cuda(*tensors) and contiguous and triton_available()):
        return reference.cg_update(state, Ap, tol)
    # A compile or launcher failure is raised before the kernel writes to the state, so the
    # reference can take this step from the same state.
    return run_triton("cg_update", reference.cg_update, state, Ap, tol)
