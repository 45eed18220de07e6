"""Call-time switches of the GEMM kernels (``scaled_linear``, ``gram``) and the tile autotuner
they share. Imports no Triton.

Two switches, each read at every call (never at import), each off by default until a GPU
measurement shows it wins (``bench/gpu_bench.py``'s kernels section times both ways):

- ``RNF_FAST_TRITON_PRECISION``: the input precision of the float32 ``tl.dot``: ``"ieee"``
  (the default: FMA units, no tensor cores) or ``"tf32x3"`` (each product split into three
  TF32 tensor-core products, about float32 accuracy; whether it meets the closeness rule is
  for a GPU run to measure). The float64 Gram has no ``tl.dot``: the switch leaves it alone.
- ``RNF_FAST_TRITON_AUTOTUNE=1``: a launcher times each tile configuration of its small set on
  the first call for a shape (:func:`tuned`) and keeps the fastest for the process; unset or
  ``0``, the fixed tiles of today run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

__all__ = [
    "AUTOTUNE_ENV",
    "PRECISIONS",
    "PRECISION_ENV",
    "autotune_enabled",
    "clear_tuned",
    "input_precision",
    "tuned",
    "tuned_choices",
]

PRECISION_ENV = "RNF_FAST_TRITON_PRECISION"
AUTOTUNE_ENV = "RNF_FAST_TRITON_AUTOTUNE"
# No plain "tf32": TF32 keeps 10 mantissa bits (unit roundoff 2^-11, 8,192x float32's), far
# past the closeness rule (2x PyTorch's float32 error) at any size.
PRECISIONS = ("ieee", "tf32x3")
TUNE_SAMPLES = 3  # timed samples per configuration on CUDA (the fastest counts)
TUNE_CALLS = 5  # launches per sample

_Config = TypeVar("_Config", bound=Hashable)
_lock = threading.Lock()
_choices: dict[Hashable, Hashable] = {}


def input_precision(precision: str | None = None) -> str:
    """The input precision of the float32 ``tl.dot``: ``precision``, or when None the value of
    ``RNF_FAST_TRITON_PRECISION`` read now (unset or empty: ``"ieee"``).

    Raises:
        ValueError: a value outside :data:`PRECISIONS`, naming where it came from.
    """
    name = "precision"
    if precision is None:
        name, precision = PRECISION_ENV, os.environ.get(PRECISION_ENV, "") or "ieee"
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autotune_enabled(autotune: bool | None = None) -> bool:
    """Whether to autotune the tiles: ``autotune``, or when None whether
    ``RNF_FAST_TRITON_AUTOTUNE`` is ``1`` (read now; unset, empty or ``0``: no).

    Raises:
        ValueError: the variable holds anything else (a typo must not pass for "off").
    """
    if autotune is not None:
        return autotune
    value = os.environ.get(AUTOTUNE_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1 (unset: 0), got {value!r}")
    return value == "1"


def _seconds(run: Callable[[], object], device: torch.device) -> float:
    """Seconds per call of ``run`` after one warm-up call (which compiles): the fastest of
    :data:`TUNE_SAMPLES` samples of :data:`TUNE_CALLS` calls timed by CUDA events; off CUDA
    (the interpreter) one call on the wall clock, which only exercises the path."""
    run()
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    samples = []
    for _ in range(TUNE_SAMPLES):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TUNE_CALLS):
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / TUNE_CALLS)
    return min(samples)


def _triton_error(exc: BaseException) -> bool:
    """A Triton compile-time rejection (out of shared memory on a smaller chip, say)."""
    return any(c.__module__.split(".")[0] == "triton" for c in type(exc).__mro__)


def tuned(
    key: Hashable,
    configs: Sequence[_Config],
    run: Callable[[_Config], object],
    device: torch.device,
    default: _Config,
) -> _Config:
    """The fastest configuration for ``key``: remembered from an earlier call, else timed now.

    Each configuration is launched by ``run(config)`` (on the caller's real tensors: the
    kernels are pure, the launch after the choice writes the result). A configuration that
    Triton rejects on this chip is left out; if all are, the first rejection is raised. While
    a CUDA graph is being captured nothing can be timed: ``default`` is returned and nothing
    is remembered.

    Arguments:
        key: what the choice depends on (kernel, shapes, strides, dtype, device, precision).
        configs: the candidates (hashable).
        run: launches the kernel with one configuration.
        device: where it runs (CUDA: timed by events; elsewhere by the wall clock, once).
        default: the launcher's fixed choice.

    Returns:
        One of ``configs`` (``default`` during a capture).
    """
    with _lock:
        if key in _choices:
            return _choices[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return default
    times, rejected = {}, []
    for config in configs:
        try:
            times[config] = _seconds(lambda config=config: run(config), device)
        except Exception as exc:
            if not _triton_error(exc):
                raise
            rejected.append(exc)
    if not times:
        raise rejected[0]
    best = min(times, key=times.__getitem__)
    with _lock:
        return _choices.setdefault(key, best)


def tuned_choices() -> dict[Hashable, Hashable]:
    """The choices made so far in this process: ``{key: config}`` (a copy)."""
    with _lock:
        return dict(_choices)


def clear_tuned() -> None:
    """Forget every choice (the next call per shape times its configurations again)."""
    with _lock:
        _choices.clear()
