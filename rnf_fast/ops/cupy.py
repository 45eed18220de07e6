"""The ``"cupy"`` backend: the CUDA kernels of ``csrc/cuda`` compiled at run time by NVRTC
through CuPy, for a CUDA build of torch whose ``rnf_fast._C`` has no CUDA (torch's wheels bring
the CUDA runtime, not nvcc).

The same op names, signatures and semantics as the CUDA ops of the ``"cpp"`` backend
(:mod:`rnf_fast.ops.cpp`), from the same device code: ``csrc/cuda/*_device.cuh``, whose
``extern "C"`` entry points (``rnf_cg_update_f32``, ``rnf_cholesky_logdet_f64``, ...) the
extension also launches. :func:`cg_update`, :func:`lanczos_logquad`, :func:`cholesky_logdet`
and :func:`cholesky_inverse` run them on float32/float64 CUDA tensors, in place on torch's
memory (the kernels get the tensors' data pointers: no copy) and on torch's current stream.
Each call runs the reference where the kernels do not reach: tensors off CUDA, other or mixed
dtypes, mixed devices, d or M above :data:`MAX_DIM` = 64, more than :data:`MAX_JITTER_STEPS`
jitters, a non-contiguous CG state. The ops this module lacks are those of its base backend,
``"triton"`` (see :mod:`rnf_fast.ops.dispatch`).

CuPy is imported at the first op on a CUDA tensor, never at import. Each op family
(``cg_update``, ``cholesky``, ``lanczos_logquad``) is compiled by NVRTC at its first use with
:func:`nvrtc_options` and loaded once per device; CuPy also keeps the binary in its kernel cache
(``~/.cupy/kernel_cache``) for the next process. A failure to import CuPy, to compile or to load
a module happens before anything is launched: it is recorded (:func:`cupy_failure`, with
NVRTC's log), warned about once (:class:`CupyFallbackWarning`), keeps the kernels off for the
rest of the process, and the call returns the reference's result.

Like the ``"cpp"`` backend, :func:`cg_update` updates the state's tensors in place (the
reference rebinds some of them), a Lanczos tridiagonal with NaN or Inf entries gives a NaN
estimate, and :func:`cholesky_inverse` of a factor with a zero pivot gives Inf/NaN entries.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import threading
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import cpp, reference
from .frames import stacklevel_outside_ops
from .reference import JITTER_STEPS, CGState

__all__ = [
    "CupyFallbackWarning",
    "DEVICE_FILES",
    "MAX_DIM",
    "MAX_JITTER_STEPS",
    "cg_update",
    "cholesky_inverse",
    "cholesky_logdet",
    "cupy_failure",
    "device_source",
    "disabled_reason",
    "entry_point",
    "lanczos_logquad",
    "nvrtc_options",
    "source_dir",
    "unavailable_reason",
]

# The limits of csrc/views.h (kMaxDim, kMaxJitterSteps) and the launch shapes of the device
# headers (kWarp, kCgThreads, kLanczosThreads, kCholeskyThreads); tests/test_cupy_backend.py
# checks that they agree.
MAX_DIM = 64
MAX_JITTER_STEPS = 8
_WARP = 32
_CG_THREADS = 256
_LANCZOS_THREADS = 128
_CHOLESKY_THREADS = 128

DEVICE_FILES = (
    "views.h",
    "system_math.h",
    "cuda/cg_update_device.cuh",
    "cuda/cholesky_device.cuh",
    "cuda/lanczos_logquad_device.cuh",
)
"""The files of the device code, relative to :func:`source_dir`."""

_FAMILY = {  # the device header (cuda/<family>_device.cuh) of each op
    "cg_update": "cg_update",
    "cholesky_logdet": "cholesky",
    "cholesky_inverse": "cholesky",
    "lanczos_logquad": "lanczos_logquad",
}
_FLOATS = (torch.float32, torch.float64)
_lock = threading.Lock()
_modules: dict[str, Any] = {}  # family -> cupy.RawModule (compiled per device on first use)
_kernels: dict[tuple[str, int], Any] = {}  # (entry point, device index) -> cupy.RawKernel
_failure: str | None = None  # the first import/compile/load failure of this process


class CupyFallbackWarning(RuntimeWarning):
    """CuPy, or NVRTC through it, failed to build a kernel; the PyTorch reference runs instead."""


@functools.cache
def _cupy_installed() -> bool:
    return importlib.util.find_spec("cupy") is not None


@functools.cache
def source_dir() -> Path | None:
    """The folder holding :data:`DEVICE_FILES`: ``rnf_fast/csrc`` (for a wheel that ships them
    there; setup.py does not yet), else ``csrc/`` of the checkout this package runs from (an
    editable install); None without."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if all((candidate / name).is_file() for name in DEVICE_FILES):
            return candidate
    return None


def _c_has_cuda() -> bool:
    return cpp._C is not None and bool(cpp._C.WITH_CUDA)


def unavailable_reason() -> str | None:
    """Why the backend cannot be used here, or None when it can: CuPy installed, a CUDA
    device, and the device sources found (:func:`source_dir`). Compiling is left to the first
    op (a failure then is :func:`disabled_reason`)."""
    if not _cupy_installed():
        return (
            "CuPy is not installed (pip install 'rnf_fast[cuda-jit]' for CUDA 12, or "
            "'rnf_fast[cuda-jit-cu13]' for a CUDA 13 build of torch)"
        )
    if not torch.cuda.is_available():
        return "no CUDA device: the CuPy kernels run on CUDA tensors only"
    if source_dir() is None:
        return (
            "the device sources (csrc/views.h, csrc/system_math.h, csrc/cuda/*_device.cuh) "
            "are not found beside the package: install from a checkout (pip install "
            "--no-build-isolation -e .), a wheel does not ship them"
        )
    return None


def disabled_reason() -> str | None:
    """Why ``"auto"`` skips this backend although it is available, or None: not needed where
    ``rnf_fast._C`` has CUDA kernels (the ``"cpp"`` and ``"triton"`` backends run them), or
    off after a failure in this process (:func:`cupy_failure`; the ops then run the
    reference). By name the backend stays usable."""
    if _failure is not None:
        return f"disabled in this process after a failure: {_failure}"
    if _c_has_cuda():
        return "not needed: rnf_fast._C has CUDA kernels (backends 'cpp' and 'triton' run them)"
    return None


def cupy_failure() -> str | None:
    """The import, NVRTC or module-load failure that switched the kernels off in this process
    (NVRTC's log included), or None when there was none."""
    return _failure


def nvrtc_options(root: Path) -> tuple[str, ...]:
    """The NVRTC options of the device code under ``root`` (:func:`source_dir`); CuPy adds the
    device's architecture. The device headers include their neighbours by relative paths."""
    return ("-std=c++17", f"-I{root / 'cuda'}")


def device_source(family: str, root: Path) -> str:
    """The NVRTC source of one op family: an include of ``cuda/<family>_device.cuh``, behind a
    digest of every device file (CuPy's kernel cache keys on the source text, not on the
    headers it includes, so a changed header must change the text).

    Arguments:
        family: ``"cg_update"``, ``"cholesky"`` or ``"lanczos_logquad"``.
        root: the folder holding :data:`DEVICE_FILES` (:func:`source_dir`).
    """
    if family not in set(_FAMILY.values()):
        raise ValueError(f"family must be one of {sorted(set(_FAMILY.values()))}, got {family!r}")
    digest = hashlib.sha256(b"".join((root / name).read_bytes() for name in DEVICE_FILES))
    return f'// rnf_fast device code {digest.hexdigest()[:16]}\n#include "{family}_device.cuh"\n'


def entry_point(op: str, dtype: torch.dtype) -> str:
    """The ``extern "C"`` kernel of ``op`` for ``dtype``, e.g. ``rnf_cg_update_f64``."""
    return f"rnf_{op}_{'f32' if dtype == torch.float32 else 'f64'}"


def _record_failure(op: str, exc: BaseException) -> None:
    """Keep the first failure's cause (NVRTC's log for a compile error) and warn, once."""
    global _failure
    if type(exc).__name__ == "CompileException":  # cupy.cuda.compiler: its text is the log
        cause = f"NVRTC failed to compile cuda/{_FAMILY[op]}_device.cuh: {str(exc).strip()}"
    else:
        cause = f"{op}: {type(exc).__name__}: {str(exc).strip()}"
    with _lock:
        if _failure is not None:
            return
        _failure = cause[:4000]
    warnings.warn(
        f"the CuPy backend failed ({cause[:600]}); the PyTorch reference runs instead and the "
        "CuPy kernels stay off for the rest of this process. CuPy's wheel must match torch's "
        "CUDA major version (cupy-cuda12x, cupy-cuda13x)",
        CupyFallbackWarning,
        stacklevel=stacklevel_outside_ops(),
    )


def _module(family: str) -> Any:
    """The op family's ``cupy.RawModule`` (compiled by NVRTC per device on first use)."""
    import cupy

    with _lock:
        module = _modules.get(family)
        if module is None:
            root = source_dir()
            module = cupy.RawModule(code=device_source(family, root), options=nvrtc_options(root))
            _modules[family] = module
    return module


def _build(op: str, entry: str, index: int) -> Any:
    """Import CuPy, compile the op's family by NVRTC for device ``index`` (once: CuPy keeps it)
    and load it there; returns the entry point's ``cupy.RawKernel``."""
    import cupy

    with cupy.cuda.Device(index):
        return _module(_FAMILY[op]).get_function(entry)


def _kernel(op: str, like: Tensor) -> Any | None:
    """The compiled kernel of ``op`` for ``like``'s dtype and device, or None once a failure to
    import CuPy, compile or load is recorded (warned about; nothing was launched)."""
    if _failure is not None:
        return None
    key = (entry_point(op, like.dtype), like.device.index)
    kernel = _kernels.get(key)
    if kernel is None:
        try:
            kernel = _build(op, *key)
        except Exception as exc:  # nothing was launched: the reference can still answer
            _record_failure(op, exc)
            return None
        _kernels[key] = kernel
    return kernel


def _launch(
    kernel: Any, like: Tensor, grid: int, block: int, shared_mem: int, args: tuple[Any, ...]
) -> None:
    """Launch ``kernel`` on ``like``'s device and torch's current stream there."""
    import cupy

    index = like.device.index
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(index).cuda_stream)
    with cupy.cuda.Device(index):
        kernel((grid,), (block,), args, shared_mem=shared_mem, stream=stream)


def _on_cuda(*tensors: Tensor) -> bool:
    """Whether the tensors are all on one CUDA device."""
    first = tensors[0]
    return first.device.type == "cuda" and all(t.device == first.device for t in tensors)


def _covers(*tensors: Tensor) -> bool:
    """Whether the kernels take these tensors: one float dtype, one CUDA device, CuPy usable."""
    first = tensors[0]
    if first.dtype not in _FLOATS or not all(t.dtype == first.dtype for t in tensors):
        return False
    return _on_cuda(*tensors) and _cupy_installed() and source_dir() is not None


def _square_batch(M: Tensor) -> bool:
    """(..., d, d) with 1 <= d <= MAX_DIM: the shapes the matrix kernels take."""
    return M.dim() >= 2 and M.shape[-1] == M.shape[-2] and 0 < M.shape[-1] <= MAX_DIM


def _check(
    t: Tensor, name: str, like: Tensor, dtype: torch.dtype, shape: tuple[int, ...], expected: str
) -> None:
    """Device, dtype, shape and contiguity of ``t``, as the extension's binding checks them."""
    if t.device != like.device:
        raise ValueError(
            f"{name} must be on {like.device} like the op's other inputs, got {t.device}"
        )
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {expected} = {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _scalar(value: float, dtype: torch.dtype) -> Any:
    import numpy

    return numpy.float32(value) if dtype == torch.float32 else numpy.float64(value)


def _pointers(*tensors: Tensor) -> tuple[Any, ...]:
    """The tensors' data pointers as 64-bit kernel arguments (CuPy passes the bytes as is)."""
    import numpy

    return tuple(numpy.uint64(t.data_ptr()) for t in tensors)


def cg_update(state: CGState, Ap: Tensor, tol: float) -> Tensor:
    """Advance every active system by one CG step, given A p; update ``state`` in place.

    Same semantics as :func:`rnf_fast.ops.reference.cg_update`, in one fused kernel (a warp
    per system): per-system stop on ‖r‖ <= tol · ‖b‖, breakdown on pᵀAp <= 0 (or NaN),
    inactive systems frozen, column ``state.it`` of ``state.alphas`` / ``state.betas`` written.

    Arguments and returns: those of :func:`rnf_fast.ops.reference.cg_update`.
    """
    s = state
    floats = (s.x, s.r, s.p, s.rr, s.bb, s.alphas, s.betas)
    contiguous = all(t.is_contiguous() for t in floats)
    kernel = _kernel("cg_update", s.x) if _covers(*floats) and contiguous else None
    if kernel is None:
        return reference.cg_update(state, Ap, tol)
    if s.x.dim() != 2 or s.alphas.dim() != 2:
        raise ValueError(
            f"x must be (N, d) and alphas (N, max_iter), got {list(s.x.shape)} and "
            f"{list(s.alphas.shape)}"
        )
    (N, d), max_iter, dtype = s.x.shape, s.alphas.shape[1], s.x.dtype
    Ap = Ap.to(dtype).contiguous()
    for t, name in ((s.r, "r"), (s.p, "p"), (Ap, "Ap")):
        _check(t, name, s.x, dtype, (N, d), "(N, d)")
    for t, name in ((s.rr, "rr"), (s.bb, "bb")):
        _check(t, name, s.x, dtype, (N,), "(N,)")
    for t, name in ((s.active, "active"), (s.breakdown, "breakdown")):
        _check(t, name, s.x, torch.bool, (N,), "(N,)")
    _check(s.steps, "steps", s.x, torch.int64, (N,), "(N,)")
    for t, name in ((s.alphas, "alphas"), (s.betas, "betas")):
        _check(t, name, s.x, dtype, (N, max_iter), "(N, max_iter)")
    if not 0 <= s.it < max_iter:
        raise ValueError(f"it must be in [0, max_iter) = [0, {max_iter}), got {s.it}")
    alpha = torch.empty(N, dtype=dtype, device=s.x.device)
    if N:
        import numpy

        pointers = (s.x, s.r, s.p, s.rr, s.bb, s.active, s.breakdown, s.steps, s.alphas, s.betas)
        sizes = (numpy.int64(N), numpy.int64(d), numpy.int64(max_iter), numpy.int64(s.it))
        blocks = (N * _WARP + _CG_THREADS - 1) // _CG_THREADS
        args = (*_pointers(*pointers, Ap, alpha), *sizes, _scalar(tol * tol, dtype))
        _launch(kernel, s.x, blocks, _CG_THREADS, 0, args)
    state.it += 1
    return alpha


def lanczos_logquad(alphas: Tensor, betas: Tensor, steps: Tensor, bb: Tensor) -> Tensor:
    """Stochastic Lanczos quadrature of bᵀ log(A) b from the coefficients of zero-start CG on b.

    Same semantics as :func:`rnf_fast.ops.reference.lanczos_logquad`, one thread per system
    (implicit QL on the first ``steps`` rows, tracking the first eigenvector components).

    Arguments and returns: those of :func:`rnf_fast.ops.reference.lanczos_logquad`.
    """
    takes = _covers(alphas, betas, bb) and alphas.dim() == 2 and alphas.shape[1] <= MAX_DIM
    kernel = _kernel("lanczos_logquad", alphas) if takes else None
    if kernel is None:
        return reference.lanczos_logquad(alphas, betas, steps, bb)
    (N, M), dtype = alphas.shape, alphas.dtype
    alphas, betas, bb = alphas.contiguous(), betas.contiguous(), bb.contiguous()
    steps = steps.long().contiguous()
    _check(betas, "betas", alphas, dtype, (N, M), "(N, M)")
    _check(steps, "steps", alphas, torch.int64, (N,), "(N,)")
    _check(bb, "bb", alphas, dtype, (N,), "(N,)")
    out = torch.empty(N, dtype=dtype, device=alphas.device)
    if N:
        import numpy

        blocks = (N + _LANCZOS_THREADS - 1) // _LANCZOS_THREADS
        pointers = _pointers(alphas, betas, steps, bb, out)
        args = (*pointers, numpy.int64(N), numpy.int64(M))
        _launch(kernel, alphas, blocks, _LANCZOS_THREADS, 0, args)
    return out


def cholesky_logdet(
    A: Tensor, *, jitter_steps: tuple[float, ...] = JITTER_STEPS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cholesky factor and log det of many small SPD matrices, with bounded jitter.

    Same semantics as :func:`rnf_fast.ops.reference.cholesky_logdet` (the lower triangle of A is
    read; failed systems retry with ``s · eps · |tr A| / d`` added to the diagonal for each
    ``s`` of ``jitter_steps``), a block per matrix. Where ``info > 0`` the factor is not
    specified.

    Arguments and returns: those of :func:`rnf_fast.ops.reference.cholesky_logdet`.
    """
    takes = _covers(A) and _square_batch(A) and len(jitter_steps) <= MAX_JITTER_STEPS
    kernel = _kernel("cholesky_logdet", A) if takes else None
    if kernel is None:
        return reference.cholesky_logdet(A, jitter_steps=jitter_steps)
    batch, d = A.shape[:-2], A.shape[-1]
    A3 = A.reshape(-1, d, d).contiguous()
    N = A3.shape[0]
    L = torch.empty_like(A3)
    logdet = torch.empty(N, dtype=A.dtype, device=A.device)
    jitter = torch.empty_like(logdet)
    info = torch.empty(N, dtype=torch.int32, device=A.device)
    if N:
        import numpy

        padded = [float(s) for s in jitter_steps] + [0.0] * (MAX_JITTER_STEPS - len(jitter_steps))
        args = (
            *_pointers(A3, L, logdet, jitter, info),
            numpy.int32(d),
            numpy.int32(len(jitter_steps)),
            *(numpy.float64(s) for s in padded),
        )
        _launch(kernel, A3, N, _CHOLESKY_THREADS, d * d * A.element_size(), args)
    return L.view(A.shape), logdet.view(batch), jitter.view(batch), info.view(batch)


def cholesky_inverse(L: Tensor) -> Tensor:
    """A⁻¹ from the Cholesky factor of A = L Lᵀ (lower triangle of L read), a block per matrix.

    Arguments and returns: those of :func:`rnf_fast.ops.reference.cholesky_inverse`.
    """
    kernel = _kernel("cholesky_inverse", L) if _covers(L) and _square_batch(L) else None
    if kernel is None:
        return reference.cholesky_inverse(L)
    d = L.shape[-1]
    L3 = L.reshape(-1, d, d).contiguous()
    Ainv = torch.empty_like(L3)
    if L3.shape[0]:
        import numpy

        args = (*_pointers(L3, Ainv), numpy.int32(d))
        _launch(kernel, L3, L3.shape[0], _CHOLESKY_THREADS, d * d * L.element_size(), args)
    return Ainv.view(L.shape)
