"""The whole CG solve as one CUDA graph: captured once per shape, replayed by later calls.

An eager fixed-iteration solve launches some ten small kernels per iteration (the products'
GEMMs and scales, the fused CG update, the image's update), each with the Python and launch
cost of an op; a graph replays all of them as one launch, with no Python in between.
``CG(cuda_graph=True)`` (or ``RNF_FAST_CG_GRAPH=1``) runs the stochastic path's solve this way:

- **Capture**, at the first call for a key: every tensor reachable from the call's
  linearization, preconditioner, z, probes and warm start is cloned into a static buffer (a
  structural copy of those objects whose tensors are the buffers), the fixed-iteration solve
  (:func:`rnf_fast.engine.cg.batched_cg` with ``fixed_iterations=True`` and the running image
  J u) runs once on a side stream (warm-up: cuBLAS handles, Triton and NVRTC compiles), then is
  captured into a ``torch.cuda.CUDAGraph``.
- **Replay**, at each later call with the same key: the call's tensors are copied into the
  static buffers (one ``_foreach_copy_``), the graph is replayed, and its outputs are cloned
  (the next replay overwrites them).
- **The key** is everything that fixes the captured work: the runner, the solve's settings
  (K, the linalg dtype, tol, max_iter, the backend) and the structure of the inputs: each
  object's type, each tensor's shape, dtype and device, every other attribute's value, and
  each module an object refers to by identity and the data pointers of its parameters and
  buffers. A new shape (B, K, d, a width), dtype, tolerance or decoder captures again; the
  cache keeps the :data:`CACHE_SIZE` most recently used graphs.

What is copied and what is read in place. Tensors the linearization holds (activation
derivatives, the weights of its ``Dense`` pieces, z, the output) are copied at every call,
parameters included: about 1 MB per call on the standard MLP (16-256-256-784), a few
microseconds of a GPU's bandwidth, and a graph that stays right whatever the caller does with
its parameters. Tensors reached only through a module reference (a convolution's weight read as
``conv.weight``, a permutation's index buffer) are read in place at replay: right for
parameters updated in place (every torch optimizer); a parameter rebound to a new tensor changes
its data pointer, hence the key, and captures again. Attributes a linearization computes lazily
on its first product (``SequentialLinearization``'s WᵀW) are computed inside the graph, from
the static weights, because each run starts from a fresh structural copy of the static inputs.

The fixed-iteration solve freezes converged systems by masks, so its solution, steps,
residuals and Lanczos coefficients are those of the eager solve with ``fixed_iterations=True``
(and its solution and image those of the default stopping rule: a frozen system's further steps
are α = 0).

Where the graph does not serve a call, the eager solve runs as the call would run without
``cuda_graph`` (its own stopping rule), ``LogdetInfo.cg.graph`` gives the reason, and a
:class:`CudaGraphFallbackWarning` names it once per process and reason: the caller's autocast
(its weight-cast cache does not survive a capture), a truncation (``CG(truncation=...)`` draws
its iteration count at each call), a generic linearization (``torch.func`` closures hold
tensors no copy can refresh), an input structure the copy cannot own (a tensor inside a
function's closure, an object with ``__slots__``), or a failed capture (a host synchronisation
inside the decoder's products, an op that cannot be captured), remembered for its key.

``LogdetInfo.cg.graph``: ``"captured"`` (this call captured and replayed), ``"replayed"``,
``"eager: <reason>"``, or None when the graph was not asked for.

Tests and the CPU smoke run of the benchmark use :class:`EmulatedGraphs` (:func:`emulated`):
its capture runs the solve and its replay runs it again on the static buffers and writes the
results into the captured outputs, which is what a CUDA graph does with the same buffers.
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..ops.dispatch import Backend
from .cg import CGResult
from .checks import warn_at_caller

__all__ = [
    "CACHE_SIZE",
    "GRAPH_ENV",
    "CudaGraphFallbackWarning",
    "CudaGraphs",
    "EmulatedGraphs",
    "GraphRunner",
    "GraphedCG",
    "ReplayedProduct",
    "check_cuda_graph",
    "clear_cache",
    "emulated",
    "requested",
    "solve_graphed",
]

GRAPH_ENV = "RNF_FAST_CG_GRAPH"  # "1": calls that do not set cuda_graph use it (read per call)
CACHE_SIZE = 8
"""Captured graphs kept per process (least recently used dropped first)."""


class CudaGraphFallbackWarning(UserWarning):
    """A call asked for the CUDA-graph solve and ran the eager one (once per reason)."""


# --- runners -------------------------------------------------------------------------------


class Replay(Protocol):
    """A captured graph."""

    def replay(self) -> None: ...


class GraphRunner(Protocol):
    """How a solve is warmed up and captured: :class:`CudaGraphs`, or a stand-in."""

    def supports(self, device: torch.device) -> bool:
        """Whether it captures work on ``device``."""
        ...

    def warmup(self, fn: Callable[[], object], device: torch.device) -> None:
        """Run ``fn`` once as capture needs it run first (on a side stream)."""
        ...

    def capture(
        self, fn: Callable[[], tuple[Tensor, ...]], device: torch.device
    ) -> tuple[Replay, tuple[Tensor, ...]]:
        """Capture ``fn``: the graph, and its outputs, which each replay rewrites."""
        ...


class CudaGraphs:
    """``torch.cuda.CUDAGraph`` captured under ``torch.cuda.graph``, after a warm-up on the
    same side stream (as CUDA graphs require: lazy initialisations such as a cuBLAS
    workspace for the stream, or a kernel's first compile, must not happen inside a capture).
    One side stream per device, made at first use (nothing touches CUDA at import)."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def warmup(self, fn: Callable[[], object], device: torch.device) -> None:
        with torch.cuda.device(device):
            current, side = torch.cuda.current_stream(), self._stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                fn()
            current.wait_stream(side)

    def capture(
        self, fn: Callable[[], tuple[Tensor, ...]], device: torch.device
    ) -> tuple[Replay, tuple[Tensor, ...]]:
        with torch.cuda.device(device):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream(device)):
                outputs = fn()
        return graph, outputs


class EmulatedGraphs:
    """A stand-in for CUDA graphs on any device, for tests and CPU smoke runs: ``capture``
    runs the function and keeps its outputs; ``replay`` runs it again and copies the results
    into those outputs. The function reads the static buffers, as the graph's kernels do, so a
    tensor of the inputs that is not copied into them gives the previous call's answer here as
    it would on a GPU.

    Attributes:
        captures, replays: how many of each it did.
    """

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def supports(self, device: torch.device) -> bool:
        return True

    def warmup(self, fn: Callable[[], object], device: torch.device) -> None:
        fn()

    def capture(
        self, fn: Callable[[], tuple[Tensor, ...]], device: torch.device
    ) -> tuple[Replay, tuple[Tensor, ...]]:
        outputs = fn()
        self.captures += 1
        return _EmulatedGraph(self, fn, outputs), outputs


class _EmulatedGraph:
    def __init__(
        self, runner: EmulatedGraphs, fn: Callable[[], tuple[Tensor, ...]], outputs: tuple
    ) -> None:
        self.runner, self.fn, self.outputs = runner, fn, outputs

    def replay(self) -> None:
        self.runner.replays += 1
        with torch.no_grad():
            for static, new in zip(self.outputs, self.fn(), strict=True):
                static.copy_(new)


_runner: GraphRunner = CudaGraphs()


@contextlib.contextmanager
def emulated(runner: GraphRunner | None = None) -> Iterator[GraphRunner]:
    """Capture with ``runner`` (default a new :class:`EmulatedGraphs`) inside the block, on
    any device it supports: the hook for tests and the benchmark's CPU smoke run.

    Example:
        >>> with emulated() as runner:
        ...     runner.captures
        0
    """
    global _runner
    previous, _runner = _runner, EmulatedGraphs() if runner is None else runner
    try:
        yield _runner
    finally:
        _runner = previous


# --- the option ----------------------------------------------------------------------------


def check_cuda_graph(option: bool | None, z: Tensor) -> None:
    """``cuda_graph=True`` needs z on a device the graphs serve (CUDA).

    Raises:
        ValueError: naming ``cuda_graph`` and z's device.
    """
    if option is True and not _runner.supports(z.device):
        raise ValueError(
            f"cuda_graph=True needs z on a CUDA device, got z on {z.device}; leave cuda_graph "
            f"unset (or set {GRAPH_ENV}=1, which is ignored off CUDA) to run the same code on "
            "every device"
        )


def requested(option: bool | None, z: Tensor) -> bool:
    """Whether a call runs its solve through a graph: ``option`` when given, else
    ``RNF_FAST_CG_GRAPH=1`` (read now) where z's device is served (silently off elsewhere)."""
    if option is not None:
        return option
    return os.environ.get(GRAPH_ENV, "0") == "1" and _runner.supports(z.device)


# --- the structural copy -------------------------------------------------------------------


class _Unsupported(Exception):
    """An input structure the static copy cannot own; the message says where and what."""


_CONSTANTS = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    range,
    type,
    enum.Enum,
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
    torch.Size,
)
_BUILTINS = (types.BuiltinFunctionType, types.BuiltinMethodType)
_BY_REFERENCE = (nn.Module, types.FunctionType, *_BUILTINS)


def _module_signature(module: nn.Module) -> Hashable:
    """A module by identity, and where its tensors live (a rebound parameter changes it)."""
    tensors = (*module.parameters(), *module.buffers())
    return ("module", id(module), tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors))


class _Walk:
    """One pass over a structure of objects, lists, tuples, dicts and tensors, in a fixed
    order: its ``signature`` (everything but the tensors' values; hashable), its ``tensors``
    (each once), and its copy: every object and container rebuilt, every tensor t replaced by
    ``leaf(t)`` (collected in ``copies``, in the order of ``tensors``).

    Modules, functions and builtins are kept by reference (modules signed by identity and the
    data pointers of their tensors, functions by code and by a closure that may hold only
    constants, modules and functions); anything else is :class:`_Unsupported`.
    """

    def __init__(self, leaf: Callable[[Tensor], Tensor]) -> None:
        self.leaf = leaf
        self.signature: list[Hashable] = []
        self.tensors: list[Tensor] = []
        self.copies: list[Tensor] = []
        # id -> (index, copy, the object itself: kept alive, so that no id is reused mid-walk)
        self._seen: dict[int, tuple[int, object, object]] = {}
        self._where: list[str] = []

    def inputs(self, named: dict[str, object]) -> tuple:
        """The copies of the named roots, in order (the names say where in a failure)."""
        return tuple(self._at(name, obj) for name, obj in named.items())

    def _fail(self, what: str) -> _Unsupported:
        return _Unsupported(f"{''.join(self._where) or 'the inputs'} is {what}")

    def visit(self, obj: object, frozen: bool = False) -> Any:
        """The copy of ``obj``; ``frozen``: inside a closure, where nothing can be copied."""
        if isinstance(obj, _CONSTANTS):
            self.signature.append((type(obj), obj))
            return obj
        if isinstance(obj, slice):
            self.signature.append(("slice", obj.start, obj.stop, obj.step))
            return obj
        if frozen and not isinstance(obj, _BY_REFERENCE + (types.MethodType, tuple)):
            # A closure keeps the original object, never the copy: nothing in it may hold
            # a tensor, even one met (and copied) elsewhere.
            raise self._fail(f"a {type(obj).__name__} inside a function's closure")
        seen = self._seen.get(id(obj))
        # Inside a closure a tuple or a method is walked again: met outside, it was copied.
        if seen is not None and not (frozen and isinstance(obj, (types.MethodType, tuple))):
            self.signature.append(("seen", seen[0]))
            return seen[1]
        if isinstance(obj, Tensor):
            self.signature.append(("tensor", obj.shape, obj.dtype, obj.device))
            self.tensors.append(obj)
            self.copies.append(self.leaf(obj))
            return self._remember(obj, self.copies[-1])
        if isinstance(obj, nn.Module):
            self.signature.append(_module_signature(obj))
            return self._remember(obj, obj)
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, _BUILTINS):
            if isinstance(getattr(obj, "__self__", None), Tensor):
                raise self._fail("a method of a tensor")
            self.signature.append(("builtin", id(obj)))
            return self._remember(obj, obj)
        if isinstance(obj, types.MethodType):
            self.signature.append(("method",))
            self._remember(obj, None)
            method = types.MethodType(self._at(".__func__", obj.__func__, frozen),
                                      self._at(".__self__", obj.__self__, frozen))  # fmt: skip
            return self._remember(obj, method)
        if type(obj) is tuple:
            self.signature.append((tuple, len(obj)))
            items = tuple(self._at(f"[{i}]", item, frozen) for i, item in enumerate(obj))
            return self._remember(obj, items)
        if frozen:
            raise self._fail(f"a {type(obj).__name__} inside a function's closure")
        if type(obj) is list:
            copy: list = self._remember(obj, [])
            self.signature.append((list, len(obj)))
            copy.extend(self._at(f"[{i}]", item) for i, item in enumerate(obj))
            return copy
        if type(obj) is dict:
            return self._dict(obj)
        return self._object(obj)

    def _at(self, where: str, obj: object, frozen: bool = False) -> Any:
        self._where.append(where)
        try:
            return self.visit(obj, frozen)
        finally:
            self._where.pop()

    def _remember(self, obj: object, copy: object) -> Any:
        index = self._seen[id(obj)][0] if id(obj) in self._seen else len(self._seen)
        self._seen[id(obj)] = (index, copy, obj)
        return copy

    def _function(self, fn: types.FunctionType) -> Any:
        # Kept by reference: an equal signature means the same code over the same constants,
        # modules and functions, so the first call's function serves every later one.
        self.signature.append(("function", fn.__code__))
        self._remember(fn, fn)
        cells = tuple(cell.cell_contents for cell in fn.__closure__ or ())
        self._at(f"<closure of {fn.__qualname__}>", (cells, fn.__defaults__), frozen=True)
        self._at(f"<defaults of {fn.__qualname__}>", fn.__kwdefaults__ or (), frozen=True)
        return fn

    def _dict(self, obj: dict) -> dict:
        copy: dict = {}
        self._remember(obj, copy)
        self.signature.append((dict, tuple(obj)))
        for key in obj:
            if not isinstance(key, _CONSTANTS):
                raise self._fail(f"a dict with a {type(key).__name__} key")
            copy[key] = self._at(f"[{key!r}]", obj[key])
        return copy

    def _object(self, obj: object) -> object:
        cls = type(obj)
        if not hasattr(obj, "__dict__") or any(
            s not in ("__dict__", "__weakref__") for s in getattr(cls, "__slots__", ())
        ):
            raise self._fail(f"a {cls.__name__} (not an object with a __dict__)")
        try:
            copy = object.__new__(cls)
        except TypeError as exc:
            raise self._fail(f"a {cls.__name__} that object.__new__ cannot make ({exc})") from exc
        self._remember(obj, copy)
        attrs = vars(obj)
        self.signature.append(("object", cls, tuple(attrs)))
        vars(copy).update({name: self._at(f".{name}", value) for name, value in attrs.items()})
        return copy


def _static(t: Tensor) -> Tensor:
    return t.detach().clone()


def _same(t: Tensor) -> Tensor:
    return t


# --- capture, cache, replay ----------------------------------------------------------------


@dataclass
class ReplayedProduct:
    """What the stochastic estimator reads of its product after a graphed solve (the part of
    ``_SplitGramProduct`` it uses), cloned from the graph's outputs.

    Attributes:
        first_image_zero: () bool, whether the first products J p were all zero.
        last_image: the last product's J p (or M p in a hidden space), in its dtype.
        image: (B, K, D) J u, detached, in z's dtype.
    """

    first_image_zero: Tensor
    last_image: Tensor
    image: Tensor

    def solution_image(self) -> Tensor:
        """J u (B, K, D), detached."""
        return self.image


@dataclass
class GraphedCG:
    """What :func:`solve_graphed` did.

    Attributes:
        status: ``"captured"``, ``"replayed"`` or ``"eager: <reason>"``.
        result: the solve's :class:`~rnf_fast.engine.cg.CGResult`; None when the graph did not
            run (the caller then runs the eager solve).
        product: the :class:`ReplayedProduct`; None likewise.
    """

    status: str
    result: CGResult | None = None
    product: ReplayedProduct | None = None


@dataclass
class _Captured:
    graph: Replay
    static: list[Tensor]  # the buffers the graph reads, in the order of a walk's tensors
    outputs: tuple[Tensor, ...]
    meta: tuple[int, Backend, bool]  # matvecs, backend, warm start
    # The static inputs: alive with the graph, so the modules it reads in place stay alive
    # (and their ids in the key unique).
    twin: dict[str, object]


Solve = Callable[..., tuple[CGResult, Any]]
"""``solve(lin, z, prec, b, y0) -> (CGResult, product)``: the fixed-iteration solve."""

_CACHE: OrderedDict[Hashable, _Captured | str] = OrderedDict()
_LOCK = threading.RLock()  # one capture or replay at a time: replays share static buffers
_WARNED: set[str] = set()


def clear_cache() -> None:
    """Drop every captured graph and remembered capture failure of this process."""
    with _LOCK:
        _CACHE.clear()


def _pack(res: CGResult, product: Any) -> tuple[tuple[Tensor, ...], tuple[int, Backend, bool]]:
    tensors = (
        res.x,
        res.steps,
        res.residuals,
        res.converged,
        res.breakdown,
        res.alphas,
        res.betas,
        res.bb,
        product.solution_image(),
        product.first_image_zero,
        product.last_image,
    )
    return tensors, (res.matvecs, res.ops, res.warm_start)


def _unpack(outputs: list[Tensor], meta: tuple[int, Backend, bool], status: str) -> GraphedCG:
    x, steps, residuals, converged, breakdown, alphas, betas, bb, image, zero, last = outputs
    matvecs, ops, warm = meta
    result = CGResult(
        x=x,
        steps=steps,
        residuals=residuals,
        converged=converged,
        breakdown=breakdown,
        matvecs=matvecs,
        alphas=alphas,
        betas=betas,
        bb=bb,
        ops=ops,
        warm_start=warm,
    )
    return GraphedCG(status, result, ReplayedProduct(zero, last, image))


def _capture(
    solve: Solve, inputs: dict[str, object], runner: GraphRunner, device: torch.device
) -> _Captured | str:
    """Static buffers, warm-up and capture; the reason where the capture failed."""
    build = _Walk(_static)
    twin = dict(zip(inputs, build.inputs(inputs), strict=True))
    meta: list[tuple[int, Backend, bool]] = []

    def run() -> tuple[Tensor, ...]:
        # A fresh structural copy per run (same buffers): attributes a linearization computes
        # on its first product are computed in every run, so inside the graph.
        fresh = _Walk(_same).inputs(twin)
        with torch.no_grad():
            tensors, info = _pack(*solve(*fresh))
        meta.append(info)
        return tensors

    # An error here is one the eager solve would raise too: it propagates.
    runner.warmup(run, device)
    try:
        graph, outputs = runner.capture(run, device)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        return f"capture failed: {type(exc).__name__}: {lines[0][:200] if lines else ''}"
    return _Captured(graph, build.copies, outputs, meta[-1], twin)


def _fallback(reason: str) -> GraphedCG:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warn_at_caller(
            f"cuda_graph: the eager CG solve runs instead of the CUDA graph: {reason}",
            CudaGraphFallbackWarning,
        )
    return GraphedCG(f"eager: {reason}")


def _ineligible(lin: object, *, autocast: torch.dtype | None, truncation: bool) -> str | None:
    if autocast is not None:
        return "under the caller's autocast (its weight-cast cache does not survive a capture)"
    if truncation:
        return "a truncation draws its iteration count at every call"
    if getattr(lin, "path", "generic") != "explicit":
        return (
            f"{type(lin).__name__} is a generic linearization (torch.func closures hold "
            "tensors that no copy can refresh)"
        )
    return None


def solve_graphed(
    solve: Solve,
    lin: object,
    z: Tensor,
    prec: object,
    b: Tensor,
    y0: Tensor | None,
    *,
    settings: Hashable,
    autocast: torch.dtype | None = None,
    truncation: bool = False,
) -> GraphedCG:
    """Run ``solve(lin, z, prec, b, y0)`` through the cached CUDA graph of its key, capturing
    it at the first call (see the module docstring).

    Arguments:
        solve: the fixed-iteration solve; it returns (CGResult, product) with the product's
            ``solution_image()``, ``first_image_zero`` and ``last_image``.
        lin: the linearization at z.
        z: (B, d) latents.
        prec: the preconditioner, or None.
        b: (B·K, d) right-hand sides in the linalg dtype.
        y0: (B·K, d) warm start, or None.
        settings: what ``solve`` fixes beyond its inputs (K, dtypes, tol, max_iter, backend).
        autocast: the caller's autocast dtype where it applies (the graph then does not run).
        truncation: a truncation was asked for (the graph then does not run).

    Returns:
        A :class:`GraphedCG`; where its ``result`` is None the caller runs the eager solve.
    """
    reason = _ineligible(lin, autocast=autocast, truncation=truncation)
    if reason is not None:
        return _fallback(reason)
    inputs = {"lin": lin, "z": z, "prec": prec, "b": b, "y0": y0}
    walk = _Walk(_same)
    try:
        walk.inputs(inputs)
    except _Unsupported as exc:
        return _fallback(f"the inputs cannot be copied into static buffers: {exc}")
    runner = _runner
    key = (runner, settings, tuple(walk.signature))
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is None:
            entry = _capture(solve, inputs, runner, z.device)
            _CACHE[key] = entry
            while len(_CACHE) > CACHE_SIZE:
                _CACHE.popitem(last=False)
            status = "captured"
        else:
            _CACHE.move_to_end(key)
            if isinstance(entry, _Captured):
                with torch.no_grad():
                    torch._foreach_copy_(entry.static, [t.detach() for t in walk.tensors])
            status = "replayed"
        if isinstance(entry, str):
            return _fallback(entry)
        entry.graph.replay()
        outputs = [t.clone() for t in entry.outputs]
    return _unpack(outputs, entry.meta, status)
