"""Backend registry: which implementation of the engine's small ops runs for a tensor.

A backend is a module exposing the ops of :mod:`rnf_fast.ops.reference` with the same signatures.
``"torch"`` (that module) is always available and is the fallback on every device. Compiled
backends register here with the devices they serve and a priority; the default choice for a
tensor is the available backend of highest priority for its device.

Choose explicitly with the ``backend=`` argument of :func:`rnf_fast.logdet_grad`, or for a
block of code::

    with rnf_fast.use_backend("torch"):
        value = rnf_fast.logdet_grad(decoder, z)

The choice also decides the Triton matvec kernels of :mod:`rnf_fast.kernels` (the tangent and
cotangent products of the linearizations): they run only under the ``"triton"`` backend (which
``"auto"`` picks on CUDA when Triton is usable), so ``"torch"`` means PyTorch everywhere and
``"cpp"`` never launches Triton.

A backend can be unavailable (``RNF_FAST_NO_TRITON=1``, no extension, no device: asking for it
by name is an error) or disabled (Triton switched itself off after a compile or launcher
failure in this process: ``"auto"`` skips it, but asking by name still works, its ops running
the reference). :func:`backend_report` gives the reason of either. The ``"cpp"`` backend runs
the reference on CUDA tensors where the extension has no CUDA kernels or
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

from ..kernels import allow_triton

__all__ = ["available_backends", "backend_report", "get_backend", "use_backend"]


@dataclass(frozen=True)
class _Entry:
    name: str
    module: str
    devices: tuple[str, ...]
    priority: int
    probe: Callable[[], str | None]  # None when usable, else the reason it is not
    # None unless the backend switched itself off at run time (a reason: "auto" skips it).
    disabled: Callable[[], str | None] = lambda: None


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


_REGISTRY: dict[str, _Entry] = {
    "torch": _Entry("torch", "rnf_fast.ops.reference", ("cpu", "cuda", "mps", "xpu"), 0, _always),
    # csrc/ compiled as rnf_fast._C; on CUDA tensors it runs the reference unless _C was built
    # with CUDA (rnf_fast._C.WITH_CUDA).
    "cpp": _Entry("cpp", "rnf_fast.ops.cpp", ("cpu", "cuda"), 10, _cpp_probe),
    # Triton kernels (rnf_fast.kernels) for gram and cg_update, the "cpp" ops for the rest;
    # CUDA only (never CPU tensors, even where TRITON_INTERPRET=1 would run them).
    "triton": _Entry(
        "triton", "rnf_fast.ops.triton", ("cuda",), 20, _triton_probe, _triton_disabled
    ),
}
_local = threading.local()


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


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """List the usable backends, fastest first.

    Arguments:
        device: restrict to backends that serve this device type (e.g. ``"cpu"``, ``"cuda"``).

    Returns:
        Backend names, in the order the default choice tries them.
    """
    dev = None if device is None else torch.device(device).type
    entries = [
        e
        for e in _REGISTRY.values()
        if (dev is None or dev in e.devices) and _auto_skip_reason(e) is None
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
        rows.append((e.name, reason is None, reason or "devices: " + ", ".join(e.devices)))
    return rows


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"backend must be one of {sorted(_REGISTRY)} or 'auto', got {name!r}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Make ``name`` the default backend inside the ``with`` block (per thread).

    The Triton matvec kernels follow it in the block: allowed under ``"triton"`` and
    ``"auto"``, off under ``"torch"`` and ``"cpp"`` (:func:`rnf_fast.kernels.allow_triton`).

    Arguments:
        name: a backend name (:func:`backend_report`) or ``"auto"``.
    """
    if name != "auto":
        _check_name(name)
    previous = getattr(_local, "name", "auto")
    _local.name = name
    try:
        with allow_triton(name in ("auto", "triton")):
            yield
    finally:
        _local.name = previous


def get_backend(name: str | None, device: torch.device) -> tuple[str, ModuleType]:
    """Resolve a backend request for tensors on ``device``.

    Arguments:
        name: a backend name, ``"auto"``, or None (the ``use_backend`` default, else auto).
        device: the device of the tensors the ops will see.

    Returns:
        (name, module) of the backend to use. A backend named explicitly is returned even when
        disabled at run time (its ops then run the reference); one that is unavailable, or
        that does not serve ``device``, raises ``ValueError``.
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
    if device.type not in entry.devices:
        raise ValueError(
            f"backend {name!r} does not serve device {device.type!r} (serves {entry.devices})"
        )
    return name, importlib.import_module(entry.module)
