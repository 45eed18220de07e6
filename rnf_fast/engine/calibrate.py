"""``method="auto"`` calibrated on the device: time both methods on the first calls for a key,
decide, and keep the decision, exportable so that a resumed run makes the same choice.

Off by default: ``"auto"`` then follows the fitted CPU cost model (:func:`.auto.choose_method`).
It is switched on per call by ``logdet_grad(..., auto_calibrate=True)`` (the process-wide
:class:`Calibrator`) or ``auto_calibrate=Calibrator()`` (one with its own decisions, as the
trainer keeps), or for every ``"auto"`` call by the environment variable
``RNF_FAST_AUTO_CALIBRATE=1``, read at each call.

While a key calibrates, its calls run exact and CG in turn (each call returns the value and
gradient of the method it ran, so the only cost is the slower method's time on those calls).
A call is timed from its start to its end, plus, when its result takes part in a backward pass,
from the moment the gradient reaches the result to the end of that backward pass: a step's cost,
not only the forward's (the exact path's backward pushes d tangents back, CG's only K). The
clock synchronizes the device (``torch.cuda.synchronize`` on CUDA). After ``warmup + samples``
timed calls of each method, the first ``warmup`` of each are dropped and the method with the
lower median of the rest is the key's decision for the rest of the process.

A key (:func:`calibration_key`) is what the costs depend on: the decoder (its type, and the
shapes and dtypes of its parameters), B, d, K, z's dtype and device (type and index), whether a
gradient is recorded, the caller's autocast dtype, the batching and the options of either method
that change their cost (``tol``, ``preconditioner``, ``chunk_size``, ...).

Reproducibility: :meth:`Calibrator.state_dict` (:func:`calibration_state` for the process-wide
one) is a JSON-serialisable dict of the decisions and of the keys still calibrating;
:meth:`Calibrator.load_state_dict` (:func:`load_calibration_state`) restores it, and a key it
decides is used with no timing. The trainer keeps it in its checkpoints.

Example:
    >>> import torch, rnf_fast
    >>> from rnf_fast.engine.calibrate import Calibrator
    >>> dec = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
    >>> calibrator = Calibrator(warmup=0, samples=1)
    >>> z = torch.randn(4, 2, requires_grad=True)
    >>> runs = []
    >>> for _ in range(3):
    ...     ld, info = rnf_fast.logdet_grad(dec, z, auto_calibrate=calibrator, return_info=True)
    ...     ld.sum().backward()
    ...     runs.append((info.method, info.auto_decision.source))
    >>> runs[:2], runs[2][1]  # one timed call of each, then the faster one
    ([('exact', 'calibrating'), ('cg', 'calibrating')], 'calibrated')
    >>> Calibrator().load_state_dict(calibrator.state_dict())  # e.g. from a checkpoint
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import Tensor

from .options import CG, Exact, ResolvedOptions, _describe

__all__ = [
    "CALIBRATE_ENV",
    "AutoDecision",
    "Calibrator",
    "calibration_key",
    "calibration_requested",
    "calibration_state",
    "device_clock",
    "load_calibration_state",
    "merge_calibration_states",
    "resolve_calibrator",
]

CALIBRATE_ENV = "RNF_FAST_AUTO_CALIBRATE"
"""The environment switch of calibration for every ``method="auto"`` call that does not set
``auto_calibrate``: ``1`` (``true``, ``yes``, ``on``) or ``0`` (``false``, ``no``, ``off``,
unset)."""

STATE_FORMAT = "rnf_fast.auto_calibration"
STATE_VERSION = 1

METHODS: tuple[str, str] = ("exact", "cg")
"""The order in which a calibrating key's calls run the methods."""

Clock = Callable[[torch.device], float]


@dataclass(frozen=True)
class AutoDecision:
    """How ``method="auto"`` chose the method of a call (``LogdetInfo.auto_decision``).

    Attributes:
        source: ``"model"``: the fitted cost model (:func:`rnf_fast.choose_method`; calibration
            off); ``"calibrating"``: one of the first, timed, calls of its key, which run the
            methods in turn; ``"calibrated"``: the key's measured decision (timed in this
            process, or loaded with :meth:`Calibrator.load_state_dict`).
        exact_ms, cg_ms: the step times compared, in ms: predicted at B = 64 by the model, or
            the measured medians; None while calibrating.
        key: the calibration key (:func:`calibration_key`); None for the model.
    """

    source: Literal["model", "calibrating", "calibrated"]
    exact_ms: float | None = None
    cg_ms: float | None = None
    key: str | None = None


def device_clock(device: torch.device) -> float:
    """Milliseconds of a monotonic clock, once the work queued on ``device`` is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        torch.accelerator.synchronize(device)
    return time.perf_counter() * 1e3


@dataclass
class _Entry:
    """One key: its decision, or the calls and times of its calibration."""

    method: str | None = None
    exact_ms: float | None = None
    cg_ms: float | None = None
    calls: int = 0
    times: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METHODS})
    pending: _Timing | None = None


class _Timing:
    """One calibrating call being timed: its forward, then its part of a backward pass."""

    def __init__(
        self, calibrator: Calibrator, entry: _Entry, method: str, device: torch.device
    ) -> None:
        self.calibrator, self.entry, self.method, self.device = calibrator, entry, method, device
        self.forward_ms: float | None = None
        self.backward_start: float | None = None
        self.done = False
        self.start = calibrator.now(device)

    def finish(self, out: Tensor) -> None:
        """The call returned ``out``: time its forward; then its backward, if it gets one."""
        self.forward_ms = self.calibrator.now(self.device) - self.start
        if out.requires_grad:
            out.register_hook(self._backward_started)
        else:
            self.record(self.forward_ms)

    def _backward_started(self, grad: Tensor) -> None:
        if self.done or self.backward_start is not None:
            return
        self.backward_start = self.calibrator.now(self.device)
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        if not self.done:
            self.record(self.forward_ms + self.calibrator.now(self.device) - self.backward_start)

    def record(self, ms: float) -> None:
        self.done = True
        if self.entry.pending is self:
            self.entry.pending = None
            self.calibrator._record(self.entry, self.method, ms)


@dataclass(frozen=True)
class Plan:
    """What a call with ``method="auto"`` runs under a :class:`Calibrator`.

    Attributes:
        method: ``"exact"`` or ``"cg"``.
        decision: for ``LogdetInfo.auto_decision``.
        timing: the call's timer while its key calibrates (its ``finish(out)`` is called with
            the call's result), else None.
    """

    method: Literal["exact", "cg"]
    decision: AutoDecision
    timing: _Timing | None = None

    def finish(self, out: Tensor) -> None:
        """The call returned ``out`` (timed while calibrating; nothing otherwise)."""
        if self.timing is not None:
            self.timing.finish(out)


class Calibrator:
    """Decisions of ``method="auto"`` measured on the device, per :func:`calibration_key`.

    Arguments:
        warmup: timed calls of each method dropped before the medians (compilation, caches,
            allocator).
        samples: timed calls of each method whose median decides.
        clock: ``clock(device)`` in ms, synchronizing the device; default :func:`device_clock`
            (looked up at each call).

    A key's first ``2 · (warmup + samples)`` calls alternate exact and CG, starting with exact;
    then the method with the lower median runs. A call whose result gets no backward before the
    key's next call counts its forward time alone; a call that raised counts nothing.
    """

    def __init__(self, *, warmup: int = 1, samples: int = 3, clock: Clock | None = None) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be None or callable, got {type(clock).__name__}")
        self.warmup, self.samples, self.clock = warmup, samples, clock
        self._entries: dict[str, _Entry] = {}

    def now(self, device: torch.device) -> float:
        """The clock's time in ms on ``device``."""
        return (self.clock or device_clock)(device)

    def plan(self, key: str, device: torch.device) -> Plan:
        """The method of the next call for ``key`` on ``device`` (starts its timer while the key
        calibrates)."""
        entry = self._entries.setdefault(key, _Entry())
        pending = entry.pending
        if pending is not None:
            if pending.forward_ms is not None:
                pending.record(pending.forward_ms)  # no backward came before this call
            entry.pending = None  # (a call that raised is dropped)
        if entry.method is not None:
            return Plan(entry.method, AutoDecision("calibrated", entry.exact_ms, entry.cg_ms, key))
        method = METHODS[entry.calls % 2]
        entry.calls += 1
        entry.pending = _Timing(self, entry, method, device)
        return Plan(method, AutoDecision("calibrating", key=key), entry.pending)

    def _record(self, entry: _Entry, method: str, ms: float) -> None:
        entry.times[method].append(ms)
        needed = self.warmup + self.samples
        if all(len(entry.times[m]) >= needed for m in METHODS):
            entry.exact_ms, entry.cg_ms = (
                statistics.median(entry.times[m][self.warmup :]) for m in METHODS
            )
            entry.method = "cg" if entry.cg_ms < entry.exact_ms else "exact"
            entry.calls, entry.times = 0, {m: [] for m in METHODS}

    def state_dict(self) -> dict[str, Any]:
        """The decisions and the calibrations under way, as plain JSON values::

            {"format": "rnf_fast.auto_calibration", "version": 1, "entries": {
                key: {"method": "cg", "exact_ms": 12.1, "cg_ms": 8.3},          # decided
                key: {"calls": 3, "times": {"exact": [...], "cg": [...]}}}}   # calibrating

        A call still being timed (its backward not yet run) counts in ``calls``; its time is
        not in ``times``.
        """
        entries: dict[str, Any] = {}
        for key, e in self._entries.items():
            if e.method is not None:
                entries[key] = {"method": e.method, "exact_ms": e.exact_ms, "cg_ms": e.cg_ms}
            elif e.calls:
                entries[key] = {"calls": e.calls, "times": {m: list(e.times[m]) for m in METHODS}}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "entries": entries}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the entries of a :meth:`state_dict` (replacing those of the same keys; the
        other keys are kept). A decided key then runs its decision with no timing.

        Raises:
            ValueError: ``state`` is not such a dict.
        """
        entries = _check_state(state)
        for key, saved in entries.items():
            if "method" in saved:
                entry = _Entry(saved["method"], float(saved["exact_ms"]), float(saved["cg_ms"]))
            else:
                times = {m: [float(t) for t in saved["times"][m]] for m in METHODS}
                entry = _Entry(calls=int(saved["calls"]), times=times)
            self._entries[key] = entry


def _check_state(state: object) -> dict[str, Any]:
    """The entries of a calibration state, checked (a ``ValueError`` says what is wrong)."""
    what = "calibration state"
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{what} must be a dict with format {STATE_FORMAT!r}, got {state!r:.200}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{what} version must be {STATE_VERSION}, got {state.get('version')!r}")
    entries = state.get("entries")
    if not isinstance(entries, Mapping):
        raise ValueError(f"{what} entries must be a dict, got {type(entries).__name__}")

    def finite(value: object) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and math.isfinite(value)

    for key, saved in entries.items():
        ok = isinstance(key, str) and isinstance(saved, Mapping)
        if ok and "method" in saved:
            ok = saved["method"] in METHODS and all(finite(saved.get(f"{m}_ms")) for m in METHODS)
        elif ok:
            times = saved.get("times")
            ok = (
                isinstance(saved.get("calls"), int)
                and isinstance(times, Mapping)
                and all(
                    isinstance(times.get(m), list) and all(finite(t) for t in times[m])
                    for m in METHODS
                )
            )
        if not ok:
            raise ValueError(
                f"{what} entry {key!r} must be {{'method', 'exact_ms', 'cg_ms'}} (method 'exact' "
                f"or 'cg') or {{'calls', 'times': {{'exact': [...], 'cg': [...]}}}}, got {saved!r}"
            )
    return dict(entries)


def merge_calibration_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One calibration state from several (e.g. one per DDP rank): for each key the entry of the
    first state that decided it, else of the first state that holds it.

    Example:
        >>> a = {"format": STATE_FORMAT, "version": 1, "entries": {
        ...     "k": {"calls": 1, "times": {"exact": [3.0], "cg": []}}}}
        >>> b = {"format": STATE_FORMAT, "version": 1, "entries": {
        ...     "k": {"method": "cg", "exact_ms": 3.0, "cg_ms": 2.0}}}
        >>> merge_calibration_states([a, b])["entries"]["k"]["method"]
        'cg'
    """
    merged: dict[str, Any] = {}
    for state in states:
        for key, saved in _check_state(state).items():
            if key not in merged or ("method" in saved and "method" not in merged[key]):
                merged[key] = saved
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "entries": merged}


_DEFAULT = Calibrator()
"""The process-wide calibrator: ``auto_calibrate=True`` and the environment switch."""


def calibration_state() -> dict[str, Any]:
    """:meth:`Calibrator.state_dict` of the process-wide calibrator."""
    return _DEFAULT.state_dict()


def load_calibration_state(state: Mapping[str, Any]) -> None:
    """:meth:`Calibrator.load_state_dict` of the process-wide calibrator."""
    _DEFAULT.load_state_dict(state)


def calibration_requested() -> bool:
    """Whether :data:`CALIBRATE_ENV` switches calibration on (read now).

    Raises:
        ValueError: a value other than 1/0, true/false, yes/no, on/off (any case) or unset.
    """
    raw = os.environ.get(CALIBRATE_ENV, "")
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{CALIBRATE_ENV} must be 1 or 0 (true/false, yes/no, on/off), got {raw!r}")


def resolve_calibrator(auto_calibrate: object, method: object) -> Calibrator | None:
    """The calibrator of a call, from its ``auto_calibrate`` argument and ``method``.

    Arguments:
        auto_calibrate: None (:data:`CALIBRATE_ENV` decides, for ``method="auto"``), False
            (off), True (the process-wide calibrator) or a :class:`Calibrator`.
        method: the call's ``method`` argument.

    Raises:
        TypeError: ``auto_calibrate`` of another type; ValueError: True or a calibrator with a
            method other than ``"auto"``.
    """
    auto = isinstance(method, str) and method == "auto"
    if auto_calibrate is None:
        return _DEFAULT if auto and calibration_requested() else None
    if auto_calibrate is False:
        return None
    if auto_calibrate is True:
        calibrator = _DEFAULT
    elif isinstance(auto_calibrate, Calibrator):
        calibrator = auto_calibrate
    else:
        raise TypeError(
            "auto_calibrate must be None, a bool or a Calibrator, got "
            f"{type(auto_calibrate).__name__}"
        )
    if not auto:
        raise ValueError(f"auto_calibrate applies to method='auto' only, got method={method!r}")
    return calibrator


def _decoder_key(decoder: object) -> str:
    """The decoder's type name and, for a module, a digest of its parameters' shapes and dtypes."""
    if isinstance(decoder, torch.nn.Module):
        shapes = repr([(tuple(p.shape), str(p.dtype)) for p in decoder.parameters()])
        digest = hashlib.sha1(shapes.encode()).hexdigest()[:12]
        return f"{type(decoder).__qualname__}[{digest}]"
    return getattr(decoder, "__qualname__", None) or type(decoder).__qualname__


def _changed(options: Exact | CG | None, skip: tuple[str, ...]) -> list[str]:
    """``name=value`` of the options that differ from their defaults (but those in skip)."""
    if options is None:
        return []
    out = []
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name in skip or value is f.default:
            continue
        if isinstance(value, (Tensor, torch.Generator)) or type(value) is not type(f.default):
            out.append(f"{f.name}={_describe(value)}")
        elif value != f.default:
            out.append(f"{f.name}={value!r}")
    return out


def calibration_key(
    decoder: object,
    z: Tensor,
    options: ResolvedOptions,
    *,
    batching: str,
    grad: bool,
    autocast: torch.dtype | None,
) -> str:
    """The key a calibrated decision is kept under: what the costs of the methods depend on.

    Arguments:
        decoder: the call's decoder.
        z: (B, d) latents.
        options: the call's resolved options (both methods' for ``"auto"``).
        batching: the call's ``batching``.
        grad: whether the call records a gradient.
        autocast: the caller's autocast dtype that applies to the decoder's products, or None.

    Returns:
        A readable string, e.g. ``"Sequential[1a2b3c4d5e6f]/B=64/d=16/K=1/float32/cpu/grad"``.

    Example:
        >>> from rnf_fast.engine.options import resolve_options
        >>> options = resolve_options("auto", {"tol": 1e-3})
        >>> calibration_key(abs, torch.zeros(8, 2), options, batching="auto", grad=False,
        ...                 autocast=None)
        'abs/B=8/d=2/K=1/float32/cpu/nograd/tol=0.001'
    """
    B, d = z.shape
    K = options.cg.K if options.cg is not None else d
    parts = [_decoder_key(decoder), f"B={B}", f"d={d}", f"K={K}"]
    parts += [str(z.dtype).removeprefix("torch."), str(z.device), "grad" if grad else "nograd"]
    if autocast is not None:
        parts.append(f"autocast={str(autocast).removeprefix('torch.')}")
    if batching != "auto":
        parts.append(f"batching={batching}")
    parts += _changed(options.exact, skip=())
    parts += _changed(options.cg, skip=("probes", "generator"))
    return "/".join(parts)
