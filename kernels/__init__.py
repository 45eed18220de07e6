"""Triton kernels of rnf_fast, shipped as ``rnf_fast.kernels``.

Each kernel module (``linear``, ``coupling``, ``gram``, ``cg``) holds the Triton kernel and its
launcher, and imports Triton; this package imports them only when a kernel runs, so
``import rnf_fast.kernels`` works without Triton. The plain-PyTorch reference of each kernel
has the same name (:mod:`rnf_fast.kernels.reference`, and :mod:`rnf_fast.ops.reference` for
``gram`` and ``cg_update``).

The functions below are what the linearizations call: the Triton kernel for float32 CUDA
tensors when no autograd graph is being recorded through them (the kernels have no backward),
Triton is usable (:func:`triton_available`) and allowed in this thread (:func:`allow_triton`);
the reference otherwise.

When Triton does not run:

- ``RNF_FAST_NO_TRITON=1`` in the environment switches every Triton path off (these kernels and
  the ``"triton"`` backend). It is read at each call, not at import.
- A kernel that fails to compile or to build its launcher (Triton compiles each kernel and a
  small C launcher at first use: that needs a C compiler and the Python headers), or a Triton
  that does not import, makes :func:`run_triton` warn once (:class:`TritonFallbackWarning`),
  return the reference's result, and keep Triton off for the rest of the process;
  :func:`triton_failure` gives the recorded cause. An asynchronous CUDA fault (an illegal
  memory access, say) leaves the device unusable: it is raised, never hidden behind a fallback.
- ``allow_triton(False)`` turns the kernels off in the current thread. :func:`rnf_fast.logdet_grad`
  enters ``allow_triton(backend == "triton")`` for its resolved backend, and
  :func:`rnf_fast.use_backend` does the same for its block, so ``backend="torch"`` or ``"cpp"``
  never launches Triton. Outside both, Triton runs wherever it is usable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import re
import subprocess
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch import Tensor

from . import reference

__all__ = [
    "NO_TRITON_ENV",
    "TritonFallbackWarning",
    "allow_triton",
    "coupling_cotangent",
    "coupling_tangent",
    "run_triton",
    "scaled_linear",
    "triton_available",
    "triton_disabled_reason",
    "triton_failure",
    "triton_unavailable_reason",
]

NO_TRITON_ENV = "RNF_FAST_NO_TRITON"  # "1": no Triton anywhere (read at each call)

# The module holding each kernel's launcher (same name as the op).
_KERNEL_MODULES = {
    "scaled_linear": "linear",
    "coupling_tangent": "coupling",
    "coupling_cotangent": "coupling",
    "gram": "gram",
    "cg_update": "cg",
}
# Messages of asynchronous CUDA faults: the context is unusable after them, so no fallback.
_CUDA_FAULT = re.compile(
    r"CUDA error|Triton Error \[CUDA\]|illegal memory access|device-side assert|"
    r"unspecified launch failure|misaligned address"
)
_T = TypeVar("_T")
_local = threading.local()  # .allowed: the allow_triton setting of this thread
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
    """Why the kernels run the reference even on float32 CUDA tensors, or None when Triton is
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


@contextlib.contextmanager
def allow_triton(allowed: bool) -> Iterator[None]:
    """Allow (True) or forbid (False) the Triton kernels in the current thread for the
    ``with`` block; the previous setting comes back after it. The default is allowed.

    Arguments:
        allowed: whether the functions of this package may run Triton in the block (they
            still need float32 CUDA tensors and a usable Triton).
    """
    if not isinstance(allowed, bool):
        raise TypeError(f"allowed must be a bool, got {type(allowed).__name__}")
    previous = getattr(_local, "allowed", True)
    _local.allowed = allowed
    try:
        yield
    finally:
        _local.allowed = previous


def _kernel_takes(*tensors: Tensor | None) -> bool:
    """The kernels' inputs: float32 tensors on one CUDA device, no graph recorded through them."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    if first.device.type != "cuda":
        return False
    if any(t.dtype != torch.float32 or t.device != first.device for t in present):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in present))


def _use_triton(*tensors: Tensor | None) -> bool:
    """Run the kernel: inputs it takes, Triton allowed in this thread and usable."""
    return _kernel_takes(*tensors) and getattr(_local, "allowed", True) and triton_available()


def _kernel(op: str) -> Callable:
    """The Triton launcher of ``op`` (importing its module imports Triton)."""
    return getattr(importlib.import_module(f"{__name__}.{_KERNEL_MODULES[op]}"), op)


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
        stacklevel=4,
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
        args, kwargs: the op's arguments (shapes as in its docstring).

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
        return run_triton("scaled_linear", reference.scaled_linear, X, W, S, transpose=transpose)
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
        args = (dx_t, dtheta, dy_dx, dy_dtheta)
        return run_triton("coupling_tangent", reference.coupling_tangent, *args)
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
        args = (dy_t, dy_dx, dy_dtheta)
        return run_triton("coupling_cotangent", reference.coupling_cotangent, *args)
    return reference.coupling_cotangent(dy_t, dy_dx, dy_dtheta)
