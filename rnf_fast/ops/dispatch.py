"""One dispatch for every op: the backend that runs it for a call, with a fallback per op.

=========  =======================  =============  ==============================================
backend    module                   devices        ops it implements (the rest: its base's)
=========  =======================  =============  ==============================================
"torch"    rnf_fast.ops.reference   any            all of them: the spec; always available
"cpp"      rnf_fast.ops.cpp         cpu, cuda      cg_update, lanczos_logquad, cholesky_* (_C)
"triton"   rnf_fast.ops.triton      cuda           the matvec ops, gram, cg_update (Triton);
                                                   base "cpp"
"cupy"     rnf_fast.ops.cupy        cuda           cg_update, lanczos_logquad, cholesky_* (the
                                                   CUDA kernels of csrc/, compiled by NVRTC
                                                   through CuPy); base "triton"
=========  =======================  =============  ==============================================

A backend is a module holding only the ops it implements. :func:`get_backend` gives a
:class:`Backend` whose attribute for each op of :mod:`rnf_fast.ops.reference` is the backend's
own, else its base's, else the reference's. Each backend op in turn runs the reference for the
tensors its kernels do not take (another device or dtype, a recorded autograd graph, a size past
a kernel's limit), so every call has an answer.

The backend of a call: the ``backend=`` argument (of :func:`rnf_fast.logdet_grad`, or of the ops
below); else the innermost :func:`use_backend` block of this thread; else ``"auto"``, the
available backend of highest priority that serves the tensors' device: on CUDA ``"cupy"``, then
``"triton"``, ``"cpp"``, ``"torch"``; on CPU ``"cpp"``, then ``"torch"``. ``"cupy"`` is the
``"triton"`` backend with the per-system kernels of ``csrc/`` compiled at run time: ``"auto"``
picks it only where ``rnf_fast._C`` has no CUDA kernels (a CUDA build of torch installed
without nvcc) and skips it where it has them (its disabled reason says so).
:func:`rnf_fast.logdet_grad` enters ``use_backend`` with the backend it resolved, so the
linearizations' matvec ops (:func:`scaled_linear`, :func:`coupling_tangent`,
:func:`coupling_cotangent`) follow it: the Triton kernels run only under ``"triton"`` and
``"cupy"`` (one of which ``"auto"`` picks on CUDA when Triton is usable), ``"torch"`` means
PyTorch everywhere and ``"cpp"`` never launches Triton::

    with rnf_fast.use_backend("torch"):
        value = rnf_fast.logdet_grad(decoder, z)

A backend can be unavailable (``RNF_FAST_NO_TRITON=1``, no extension, CuPy not installed, no
device: asking for it by name is an error) or disabled (Triton or CuPy switched itself off after
a compile or launcher failure in this process, or ``"cupy"`` is not needed beside a CUDA build
of the extension: ``"auto"`` skips it, but asking by name still works, its ops running the
reference after a failure). :func:`backend_report` gives the reason of either. The ``"cpp"``
ops run the reference on CUDA tensors where the extension has no CUDA kernels or
``RNF_FAST_NO_CUDA_EXT=1`` switches them off (:func:`rnf_fast.ops.cpp.cuda_unavailable_reason`).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import reference

__all__ = [
    "Backend",
    "available_backends",
    "backend_report",
    "coupling_cotangent",
    "coupling_tangent",
    "get_backend",
    "scaled_linear",
    "use_backend",
]


@dataclass(frozen=True)
class _Entry:
    name: str
    module: str
    devices: tuple[str, ...] | None  # None: every device
    priority: int
    probe: Callable[[], str | None]  # None when usable, else the reason it is not
    # None unless the backend switched itself off at run time (a reason: "auto" skips it).
    disabled: Callable[[], str | None] = lambda: None
    base: str | None = None  # the backend whose ops fill in the ones this module lacks


def _always() -> str | None:
    return None


def _cpp_probe() -> str | None:
    from .cpp import unavailable_reason

    return unavailable_reason()


def _triton_probe() -> str | None:
    from .triton import unavailable_reason

    return unavailable_reason()


def _triton_disabled() -> str | None:
    from .triton import disabled_reason

    return disabled_reason()


def _cupy_probe() -> str | None:
    from .cupy import unavailable_reason

    return unavailable_reason()


def _cupy_disabled() -> str | None:
    from .cupy import disabled_reason

    return disabled_reason()


_REGISTRY: dict[str, _Entry] = {
    "torch": _Entry("torch", "rnf_fast.ops.reference", None, 0, _always),
    # csrc/ compiled as rnf_fast._C; on CUDA tensors it runs the reference unless _C was built
    # with CUDA (rnf_fast._C.WITH_CUDA).
    "cpp": _Entry("cpp", "rnf_fast.ops.cpp", ("cpu", "cuda"), 10, _cpp_probe, base="torch"),
    # Triton kernels (rnf_fast.kernels), the "cpp" ops for the rest; CUDA only (never CPU
    # tensors, even where TRITON_INTERPRET=1 would run them).
    "triton": _Entry(
        "triton", "rnf_fast.ops.triton", ("cuda",), 20, _triton_probe, _triton_disabled, "cpp"
    ),
    # The kernels of csrc/cuda compiled by NVRTC (CuPy), the "triton" ops for the rest; CUDA
    # only, above "triton" for "auto", which skips it where _C has CUDA (disabled: not needed),
    # so a CUDA build of the extension is never replaced by the same kernels compiled again.
    "cupy": _Entry(
        "cupy", "rnf_fast.ops.cupy", ("cuda",), 30, _cupy_probe, _cupy_disabled, "triton"
    ),
}
_local = threading.local()  # .name: the use_backend setting of this thread


class Backend:
    """The ops of one backend: each op of :mod:`rnf_fast.ops.reference` (with ``CGState`` and
    ``JITTER_STEPS``) as an attribute, the backend's own where its module implements it, else
    its base's, else the reference's.

    Attributes:
        name: the backend's name.

    Example:
        >>> from rnf_fast.ops import reference
        >>> ops = get_backend("torch", torch.device("cpu"))[1]
        >>> ops.name, ops.gram is reference.gram
        ('torch', True)
    """

    __slots__ = ("_modules", "name")

    def __init__(self, name: str, modules: tuple[ModuleType, ...]) -> None:
        self.name = name
        self._modules = modules

    def __getattr__(self, op: str) -> object:
        if op in reference.__all__:
            for module in self._modules:
                if op in module.__all__:
                    return getattr(module, op)
        raise AttributeError(f"backend {self.name!r} has no op {op!r}")

    def __dir__(self) -> list[str]:
        return ["name", *reference.__all__]

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def _ask(entry: _Entry, probe: Callable[[], str | None]) -> str | None:
    try:
        return probe()
    except Exception as exc:  # a probe must never break the listing
        return f"probe of {entry.name!r} failed: {exc!r}"


def _unavailable_reason(entry: _Entry) -> str | None:
    return _ask(entry, entry.probe)


def _auto_skip_reason(entry: _Entry) -> str | None:
    """Why ``"auto"`` does not pick this backend (unavailable or disabled), or None."""
    return _unavailable_reason(entry) or _ask(entry, entry.disabled)


def _serves(entry: _Entry, device_type: str) -> bool:
    return entry.devices is None or device_type in entry.devices


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """List the usable backends, fastest first.

    Arguments:
        device: restrict to backends that serve this device type (e.g. ``"cpu"``, ``"cuda"``).

    Returns:
        Backend names, in the order the default choice tries them (``"torch"`` last).

    Example:
        >>> available_backends("cpu")[-1]
        'torch'
    """
    dev = None if device is None else torch.device(device).type
    entries = [
        e
        for e in _REGISTRY.values()
        if (dev is None or _serves(e, dev)) and _auto_skip_reason(e) is None
    ]
    return [e.name for e in sorted(entries, key=lambda e: -e.priority)]


def backend_report() -> list[tuple[str, bool, str]]:
    """Describe every known backend.

    Returns:
        One (name, available, detail) row per backend, in registry order. ``available`` is
        whether ``"auto"`` may pick it; ``detail`` is the reason it is not (e.g. ``"disabled
        by RNF_FAST_NO_TRITON=1"``, a recorded Triton failure), else the devices it serves.
        Whether the ``"cpp"`` ops reach CUDA kernels is
        :func:`rnf_fast.ops.cpp.cuda_unavailable_reason`.
    """
    rows = []
    for e in _REGISTRY.values():
        reason = _auto_skip_reason(e)
        devices = "any" if e.devices is None else ", ".join(e.devices)
        rows.append((e.name, reason is None, reason or f"devices: {devices}"))
    return rows


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)} or 'auto', got {name!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the backend of every op called in the ``with`` block (per thread) that is
    not given one explicitly; the previous setting comes back after it.

    The linearizations' matvec ops follow it too: the Triton kernels run in the block only
    under ``"triton"`` and ``"auto"``. :func:`rnf_fast.logdet_grad` enters it with the backend
    it resolved.

    Arguments:
        name: a backend name (:func:`backend_report`) or ``"auto"``.
    """
    if name != "auto":
        _check_name(name)
    previous = getattr(_local, "name", "auto")
    _local.name = name
    try:
        yield
    finally:
        _local.name = previous


def _modules(name: str) -> tuple[ModuleType, ...]:
    """The backend's module, then its base's, down to the reference."""
    chain = []
    entry: _Entry | None = _REGISTRY[name]
    while entry is not None:
        chain.append(importlib.import_module(entry.module))
        entry = None if entry.base is None else _REGISTRY[entry.base]
    return tuple(chain)


def get_backend(name: str | None, device: torch.device) -> tuple[str, Backend]:
    """Resolve a backend request for tensors on ``device``.

    Arguments:
        name: a backend name, ``"auto"``, or None (the ``use_backend`` setting, else auto).
        device: the device of the tensors the ops will see.

    Returns:
        (name, ops): the backend's name and its :class:`Backend`. A backend named explicitly
        is returned even when disabled at run time (its ops then run the reference); one that
        is unavailable, or that does not serve ``device``, raises ``ValueError``.
    """
    if name is None:
        name = getattr(_local, "name", "auto")
    if name == "auto":
        name = available_backends(device)[0]
    _check_name(name)
    entry = _REGISTRY[name]
    reason = _unavailable_reason(entry)
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available: {reason}")
    if not _serves(entry, device.type):
        raise ValueError(
            f"backend {name!r} does not serve device {device.type!r} (serves {entry.devices})"
        )
    return name, Backend(name, _modules(name))


# The linearizations' ops, dispatched per call on the device of their first tensor.


def scaled_linear(
    X: Tensor,
    W: Tensor,
    S: Tensor | None = None,
    *,
    transpose: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Tangents through a linear layer and a diagonal scale, Y = (X Wᵀ) ⊙ S, or with
    ``transpose=True`` the cotangents Y = (X ⊙ S) W, run by the backend of the call (the
    Triton kernel under ``"triton"`` and ``"cupy"`` for float32 CUDA tensors, else
    :func:`rnf_fast.ops.reference.scaled_linear`).

    Arguments:
        X: (B, K, n_in) tangents (``transpose=True``: (B, K, n_out) cotangents).
        W: (n_out, n_in) the layer's weight.
        S: (B, n_out) per-sample scale (an activation's derivative σ'(a)), or None.
        transpose: apply the transposed map.
        backend: a backend name or ``"auto"``; default the ``use_backend`` setting, else auto
            for X's device.

    Returns:
        (B, K, n_out) (``transpose=True``: (B, K, n_in)).

    Example:
        >>> X, W, S = torch.randn(2, 3, 4), torch.randn(5, 4), torch.rand(2, 5)
        >>> scaled_linear(X, W, S).shape
        torch.Size([2, 3, 5])
    """
    ops = get_backend(backend, X.device)[1]
    return ops.scaled_linear(X, W, S, transpose=transpose)


def coupling_tangent(
    dx_t: Tensor, dtheta: Tensor, dy_dx: Tensor, dy_dtheta: Tensor, *, backend: str | None = None
) -> Tensor:
    """Tangents of a coupling layer's transformed half, ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p, run by
    the backend of the call (see :func:`scaled_linear`).

    Arguments:
        dx_t: (B, K, m) tangents of the transformed inputs.
        dtheta: (B, K, m, P) tangents of the transform's parameters.
        dy_dx: (B, m) cached ∂y/∂x.
        dy_dtheta: (B, m, P) cached ∂y/∂θ.
        backend: a backend name or ``"auto"``; default the ``use_backend`` setting, else auto
            for dx_t's device.

    Returns:
        (B, K, m) tangents of the outputs.
    """
    ops = get_backend(backend, dx_t.device)[1]
    return ops.coupling_tangent(dx_t, dtheta, dy_dx, dy_dtheta)


def coupling_cotangent(
    dy_t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Cotangents of a coupling layer's transformed half, x̄ = ∂y/∂x ⊙ ȳ and
    θ̄_p = ∂y/∂θ_p ⊙ ȳ, run by the backend of the call (see :func:`scaled_linear`).

    Arguments:
        dy_t: (B, K, m) cotangents of the outputs.
        dy_dx: (B, m) cached ∂y/∂x.
        dy_dtheta: (B, m, P) cached ∂y/∂θ.
        backend: a backend name or ``"auto"``; default the ``use_backend`` setting, else auto
            for dy_t's device.

    Returns:
        (B, K, m) cotangents of the inputs and (B, K, m, P) of the parameters.
    """
    ops = get_backend(backend, dy_t.device)[1]
    return ops.coupling_cotangent(dy_t, dy_dx, dy_dtheta)
