"""GPU benchmark of rnf_fast: the chip's ceilings, the kernels, and log det(JᵀJ) training steps.

Four sections, run one at a time (``--section``), each writing ``DIR/bench_<section>.json``
and rewriting it atomically after every case, so a timeout or a crash keeps every finished
row:

- ``ceilings``: device-to-device copy bandwidth, float32 and float64 matmul throughput.
- ``kernels``: each kernel and backend op against its PyTorch reference, verified then timed,
  with its achieved GB/s and TFLOP/s beside the ceilings (read from ``DIR/bench_ceilings.json``
  when it is there for this device, else measured): the Triton kernels ``scaled_linear``,
  ``coupling_tangent`` and ``coupling_cotangent``; ``gram`` and ``cg_update`` of every backend
  other than the reference; the extension's ``cholesky_logdet``, ``cholesky_inverse`` and
  ``lanczos_logquad``. The speed switches that ship off (:data:`KERNEL_SWITCHES`) are timed
  both ways: ``scaled_linear`` and the float32 ``gram`` with IEEE and tf32x3 products and
  with fixed and autotuned tiles, the float64 ``gram`` on Triton and on cuBLAS.
- ``logdet``: one training step of the log det term (forward, term, backward) on the standard
  MLP at d = 16 and 64, B = 64 and 1024, the MINIBOONE-sized flow and the MNIST-sized
  convolutional flow at the paper's width (64 channels): rnf_fast exact, CG (K = 1, 4), auto,
  each backend, against vmap(jacfwd), vmap(jacrev), the official code's CG algorithm, the
  free-form surrogate (FIF) and GPyTorch's ``linear_cg``; each verified against a float64 dense
  truth (computed on the device), then timed, with its peak memory and speed-ups.
- ``graph_cg``: the whole CG solve as one CUDA graph (``cuda_graph=True``) against the eager
  solve on the standard MLP, after checking that both give the same gradient
  (``bench/gpu_graph_cg.py``).

How answers are checked. float32: error against a float64 truth at most twice the error of a
PyTorch run at the same precision, never below eps/2 (:func:`check_close`). float64 ops with no
independent truth: within 1e-12 of the float64 reference. Batched CG (``cg_update``): float64
solves must stop at the same step as the reference in every system; float32 solves run at tol
1e-3, far above the float32 floor, and their solution and Lanczos log-quadrature are checked by
the rule above; the number of systems whose stopping step differs is reported, not asserted
(one rounding difference inside a kernel legitimately moves it). TF32 is off throughout
(``precision`` in the JSON). Log det contenders: exact ones within 1e-4 (value) and 1e-3
(gradient) of the truth; CG ones reproduce the exact gradient with K = d scaled unit probes
and a tight tolerance; the official algorithm and FIF are reported (they can be biased).

A case that fails its check or raises is a row with ``"status": "failed"`` and the error, and
the section goes on; one that cannot run here (memory, a missing package) is ``"skipped"`` with
the reason. The exit status is 1 when any case failed.

``--quick``: the kernels at one size, the log det section on the standard MLP (B = 64) and
the MINIBOONE flow only, shorter timings. Without CUDA (``--device cpu``, the default there)
the script runs on tiny problems ("quick", "quick-flow", "quick-image"): it checks the script,
not a chip.

    python3 bench/gpu_bench.py --section ceilings --out bench/results/gpu
    python3 bench/gpu_bench.py --section kernels --out bench/results/gpu
    python3 bench/gpu_bench.py --section logdet --out bench/results/gpu
    python3 bench/gpu_bench.py --report bench/results/gpu     # -> bench/results/gpu/summary.md
    python3 bench/gpu_bench.py --section all --quick --device cpu --out /tmp/gb

Each JSON: ``section``, ``device``, ``mode``, ``quick``, ``precision`` (the TF32 settings),
``machine`` (:func:`harness.machine_info`), ``sizes``, ``ceilings`` (ceilings and
kernels; kernels also ``ceilings_source``), ``complete`` (false while running or after a
crash), ``seconds``, and ``rows``: one per case, with ``case``, ``status`` (``ok``,
``skipped`` with ``reason``, ``failed`` with ``error`` and ``traceback``), ``seconds`` and the
section's measurements (times in ms, rates, errors; logdet rows also ``contender``, ``kind``,
``peak_MiB``, ``speedup_vs_jacfwd``, ``speedup_vs_official``, ``speedup_vs_jacrev``; the
kernel rows of a speed switch also ``switch``, float32 ones ``err_ratio`` and ``meets_2x_rule``,
autotuned ones ``tuned``, the tiles chosen).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from rnf_fast.kernels import tuning
from torch import Tensor

import rnf_fast
from rnf_fast.engine.api import DEFAULT_CG_TOL
from rnf_fast.engine.probes import make_probes
from rnf_fast.ops import cpp as cpp_backend
from rnf_fast.ops import cupy as cupy_backend
from rnf_fast.ops import reference
from rnf_fast.ops import reference as kernel_reference
from rnf_fast.ops import triton as kernels
from rnf_fast.ops.dispatch import available_backends, get_backend
from rnf_fast.testing import dense_jacobian, grads, rel_error

# The harness beside this script: gpu_check.sh runs it with python -P, which leaves the script's
# folder off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness.baselines import logdet_fif, logdet_official_cg  # noqa: E402
from harness.contenders import GRAD_TOL, JACFWD, JACREV, OFFICIAL, VALUE_TOL  # noqa: E402
from harness.measure import percentile, sample_seconds, sync  # noqa: E402
from harness.problems import problem_encoder  # noqa: E402

SECTIONS = ("ceilings", "kernels", "logdet", "graph_cg")


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogdetCase:
    """One log det problem: a key of :data:`harness.PROBLEMS` (or
    :data:`EXTRA_PROBLEMS`), its latent dimension d and batch B (None: the problem's), and the
    batch the float64 truth is computed on (None: the problem's ``verify_batch``, else
    min(B, 256))."""

    problem: str
    d: int | None = None
    B: int | None = None
    verify_batch: int | None = None


@dataclass(frozen=True)
class Sizes:
    """Problem sizes and time budgets of one mode."""

    copy_bytes: int  # ceiling: bytes of the copied tensor
    matmul_n: int  # ceiling: n of the n × n × n matmuls
    kernel_batches: tuple[int, ...]  # B of the kernel cases (rows B·K, CG systems N = B·K)
    K: int
    hidden: int
    D: int
    d: int
    m: int  # coupling: transformed features
    kernel_budget_s: float  # timing of one kernel call, at most (then the reference's)
    logdet: tuple[LogdetCase, ...]
    step_budget_s: float  # timing of one contender's training step, at most


# The standard case first, then the flows (the cases a cut-short run must not lose), then the
# rest of the MLP grid.
_CUDA_LOGDET = (
    LogdetCase("mlp-16-784", d=16, B=64),
    LogdetCase("flow-miniboone"),
    LogdetCase("flow-mnist-wide"),
    LogdetCase("mlp-16-784", d=16, B=1024),
    LogdetCase("mlp-16-784", d=64, B=64),
    LogdetCase("mlp-16-784", d=64, B=1024),
)
_CUDA_KERNELS = {"K": 16, "hidden": 256, "D": 784, "d": 16, "m": 392}
SIZES: dict[tuple[str, bool], Sizes] = {
    ("cuda", False): Sizes(
        copy_bytes=2**30,
        matmul_n=8192,
        kernel_batches=(64, 1024),
        **_CUDA_KERNELS,
        kernel_budget_s=0.15,
        logdet=_CUDA_LOGDET,
        step_budget_s=0.25,
    ),
    ("cuda", True): Sizes(
        copy_bytes=2**28,
        matmul_n=4096,
        kernel_batches=(64,),
        **_CUDA_KERNELS,
        kernel_budget_s=0.05,
        logdet=_CUDA_LOGDET[:2],
        step_budget_s=0.15,
    ),
    # Tiny: the CPU mode checks the script. d = 16 and N = 1,024 CG systems (B = 64, K = 16)
    # are where float32 stopping steps of the extension and the reference first differ.
    ("cpu", False): Sizes(
        copy_bytes=2**24,
        matmul_n=256,
        kernel_batches=(8, 64),
        K=16,
        hidden=32,
        D=64,
        d=16,
        m=24,
        kernel_budget_s=0.02,
        logdet=(
            LogdetCase("quick"),
            LogdetCase("quick", d=5, B=16),
            LogdetCase("quick-flow"),
            LogdetCase("quick-image"),
        ),
        step_budget_s=0.02,
    ),
    ("cpu", True): Sizes(
        copy_bytes=2**22,
        matmul_n=128,
        kernel_batches=(8,),
        K=4,
        hidden=32,
        D=64,
        d=4,
        m=24,
        kernel_budget_s=0.01,
        logdet=(LogdetCase("quick"), LogdetCase("quick-flow")),
        step_budget_s=0.01,
    ),
}
"""Sizes by (device type, quick)."""

EXTRA_PROBLEMS: dict[str, harness.ProblemSpec] = {
    "flow-mnist-wide": replace(
        harness.PROBLEMS["flow-mnist"],
        flow={**harness.PROBLEMS["flow-mnist"].flow, "image_channels": 64},
        about="MNIST-sized multi-scale conv RealNVP at the paper's width "
        "(1×28×28, 2 scales, 2 blocks, 64 channels)",
    ),
}
"""Problems of this benchmark beyond :data:`harness.PROBLEMS`."""


def _register_problems() -> None:
    """Make :data:`EXTRA_PROBLEMS` known to :func:`harness.make_problem`."""
    for name, spec in EXTRA_PROBLEMS.items():
        harness.PROBLEMS.setdefault(name, spec)


# ---------------------------------------------------------------------------------------------
# Precision, timing, recording
# ---------------------------------------------------------------------------------------------


def pin_precision() -> dict[str, object]:
    """Turn TF32 off for matmuls and convolutions (every check compares with a float64 truth
    and every ceiling is IEEE float32); returns the settings, as recorded in the JSON."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }


MIN_REPS, MAX_REPS = 3, 100
SAMPLE_S = 1e-3  # calls shorter than this are timed in groups, one sample per group


def time_call(
    fn: Callable[[], object], device: torch.device, budget_s: float, *, warmup: int = 2
) -> dict[str, float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events on CUDA, the wall clock
    on the CPU; ``MIN_REPS`` to ``MAX_REPS`` samples within about ``budget_s``, each of
    enough calls to last ``SAMPLE_S`` (so microsecond kernels are not timed one launch at a
    time).

    Returns:
        ``{"median_s", "p20_s", "p80_s", "reps", "calls_per_rep"}``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(SAMPLE_S / once))
    reps = int(min(MAX_REPS, max(MIN_REPS, budget_s / (once * calls))))
    samples = [sample_seconds(fn, device, calls) for _ in range(reps)]
    return {
        "median_s": percentile(samples, 0.5),
        "p20_s": percentile(samples, 0.2),
        "p80_s": percentile(samples, 0.8),
        "reps": reps,
        "calls_per_rep": calls,
    }


class SkipCase(Exception):
    """A case that cannot run here (not enough memory, a missing package): recorded as
    ``"skipped"`` with this message."""


def _jsonable(obj: object) -> object:
    """JSON-ready: non-finite floats as null, tuples as lists, dtypes and paths as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype | Path | torch.device):
        return str(obj)
    return obj


class SectionLog:
    """The JSON of one section: rewritten atomically (a temporary file, then ``os.replace``)
    after every row, so what is on disk is always a complete JSON of the finished cases.

    Arguments:
        out_dir: the results folder; the file is ``out_dir/bench_<section>.json``.
        section: the section's name.
        header: what the JSON records beside the rows (device, mode, machine, ...).
    """

    def __init__(self, out_dir: Path, section: str, header: dict) -> None:
        self.path = out_dir / f"bench_{section}.json"
        self.section = section
        self.started = time.perf_counter()
        self.data: dict = {"section": section, **header, "complete": False, "seconds": 0.0}
        self.data["rows"] = []
        self.write()

    @property
    def rows(self) -> list[dict]:
        return self.data["rows"]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "failed"]

    def write(self) -> None:
        self.data["seconds"] = time.perf_counter() - self.started
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_jsonable(self.data), indent=1) + "\n")
        os.replace(tmp, self.path)

    def add(self, row: dict) -> dict:
        """Record a finished row and rewrite the file."""
        self.rows.append(row)
        self.write()
        what = " | ".join(str(row[k]) for k in ("case", "impl", "contender") if row.get(k))
        note = row.get("reason") or row.get("error") or ""
        print(
            f"[{self.section}] {what}: {row['status']} ({row.get('seconds', 0):.1f} s) {note}",
            file=sys.stderr,
            flush=True,
        )
        return row

    def add_failed(self, base: dict, exc: BaseException, seconds: float = 0.0) -> dict:
        """Record ``base`` as a failed row with the error and the end of its traceback."""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return self.add(
            {
                **base,
                "status": "failed",
                "seconds": seconds,
                "error": f"{type(exc).__name__}: {exc}".strip()[:2000],
                "traceback": tb[-4000:],
            }
        )

    def run(self, base: dict, fn: Callable[[], dict]) -> dict:
        """Run one case: ``fn()``'s measurements joined to ``base`` with status ``"ok"``, or the
        reason it was skipped (:class:`SkipCase`), or the error it raised."""
        t0 = time.perf_counter()
        try:
            measured = fn()
        except SkipCase as exc:
            row = {**base, "status": "skipped", "seconds": time.perf_counter() - t0}
            return self.add({**row, "reason": str(exc)})
        except Exception as exc:
            return self.add_failed(base, exc, time.perf_counter() - t0)
        return self.add({**base, "status": "ok", "seconds": time.perf_counter() - t0, **measured})

    def finish(self) -> None:
        self.data["complete"] = True
        self.write()


# ---------------------------------------------------------------------------------------------
# The closeness rules
# ---------------------------------------------------------------------------------------------

FLOAT64_OP_TOL = 1e-12
"""float64 ops whose only truth is the float64 reference itself: their relative difference
from it (rounding of these well-conditioned ops is about 1e-15)."""


def check_close(
    name: str, got: Tensor, torch_run: Tensor, truth: Tensor, *, factor: float = 2.0
) -> tuple[float, float]:
    """The closeness rule: error against the float64 truth at most ``factor`` (2: the rule)
    times a same-precision PyTorch run's (never below eps/2 of ``got``'s dtype).

    Returns:
        (error of ``got``, error of ``torch_run``), relative, against ``truth``.

    Raises:
        AssertionError: naming the op and both errors.
    """
    err = rel_error(got.double(), truth.double())
    err_torch = rel_error(torch_run.double(), truth.double())
    if not err <= factor * max(err_torch, torch.finfo(got.dtype).eps / 2):
        raise AssertionError(f"{name}: error {err:.2e} > {factor:g} x PyTorch's {err_torch:.2e}")
    return err, err_torch


def check_op(name: str, got: Tensor, ref: Tensor, truth: Tensor) -> tuple[float, float | None]:
    """:func:`check_close` for float32 results; for float64 ones (whose truth is the float64
    reference itself) a relative difference from ``ref`` of at most :data:`FLOAT64_OP_TOL`.

    Returns:
        (error of ``got``, error of ``ref`` or None for float64).
    """
    if got.dtype != torch.float64:
        return check_close(name, got, ref, truth)
    err = rel_error(got, ref)
    if not err <= FLOAT64_OP_TOL:
        raise AssertionError(f"{name}: float64 differs from the reference by {err:.2e}")
    return err, None


# ---------------------------------------------------------------------------------------------
# Section: ceilings
# ---------------------------------------------------------------------------------------------


def copy_ceiling(device: torch.device, sizes: Sizes) -> float:
    """Device-to-device copy bandwidth, GB/s counting the read and the write."""
    src = torch.empty(sizes.copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, 0.5)["median_s"]
    return 2 * sizes.copy_bytes / t / 1e9


def matmul_ceiling(device: torch.device, sizes: Sizes, *, dtype: torch.dtype) -> float:
    """Dense n × n × n matmul throughput in TFLOP/s (float32 without TF32: the kernels
    accumulate in IEEE float32, so this is the ceiling they compete with)."""
    n = sizes.matmul_n
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_call(lambda: a @ b, device, 0.5)["median_s"]
    return 2 * n**3 / t / 1e12


CEILINGS: tuple[tuple[str, str, str, Callable[[torch.device, Sizes], float]], ...] = (
    ("copy_GBps", "copy", "GB/s", copy_ceiling),
    (
        "fp32_TFLOPs",
        "matmul float32",
        "TFLOP/s",
        functools.partial(matmul_ceiling, dtype=torch.float32),
    ),
    (
        "fp64_TFLOPs",
        "matmul float64",
        "TFLOP/s",
        functools.partial(matmul_ceiling, dtype=torch.float64),
    ),
)
"""(key, case, unit, measure) of each ceiling."""


def run_ceilings(log: SectionLog, device: torch.device, sizes: Sizes) -> None:
    """The ceilings section: one row per ceiling; ``ceilings`` in the JSON gathers them."""
    log.data["ceilings"] = {}
    for key, case, unit, measure in CEILINGS:
        row = log.run(
            {"case": case, "ceiling": key, "unit": unit},
            lambda measure=measure: {"value": measure(device, sizes)},
        )
        if row["status"] == "ok":
            log.data["ceilings"][key] = row["value"]
    log.write()


def load_ceilings(out_dir: Path, device: torch.device, sizes: Sizes) -> tuple[dict, str]:
    """The ceilings for the kernels section: those of ``out_dir/bench_ceilings.json`` when it
    was measured on this kind of device, else measured now (a ceiling that fails is left out).

    Returns:
        (ceilings, where they came from).
    """
    path = out_dir / "bench_ceilings.json"
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("device") == device.type and data.get("ceilings"):
            return data["ceilings"], f"{path.name} ({'quick' if data.get('quick') else 'full'})"
    ceil = {}
    for key, _, _, measure in CEILINGS:
        try:
            ceil[key] = measure(device, sizes)
        except Exception as exc:
            print(f"[kernels] ceiling {key} not measured: {exc!r}", file=sys.stderr)
    return ceil, "measured in this run"


# ---------------------------------------------------------------------------------------------
# Section: kernels
# ---------------------------------------------------------------------------------------------


KERNEL_SWITCHES: dict[str, tuple[str, dict[str, str]]] = {
    "default": ("switches off", {}),
    "tf32x3": ("RNF_FAST_TRITON_PRECISION=tf32x3", {tuning.PRECISION_ENV: "tf32x3"}),
    "autotune": ("RNF_FAST_TRITON_AUTOTUNE=1", {tuning.AUTOTUNE_ENV: "1"}),
    "cublas": ("RNF_FAST_GRAM_CUBLAS_MIN_D=0", {kernels.GRAM_CUBLAS_ENV: "0"}),
}
"""The speed switches that ship off, by name: (label, environment). Each row runs with all three
variables set: the defaults (IEEE products, fixed tiles, Triton's float64 Gram), then the row's
switch on top."""

_SWITCHES_OFF = {
    tuning.PRECISION_ENV: "ieee",
    tuning.AUTOTUNE_ENV: "0",
    kernels.GRAM_CUBLAS_ENV: "",
}

SWITCH_ERR_LIMIT = 64.0
"""A switch that changes the arithmetic (tf32x3) has its closeness ratio measured, not enforced
(it ships off until measured); beyond this many times the PyTorch error the row fails: that is
a broken kernel, not a rounding trade (plain TF32 would be about 10³)."""


@contextlib.contextmanager
def switched(switch: str):
    """Run the body with the environment of ``KERNEL_SWITCHES[switch]`` over the defaults (the
    variables are read at each call), restored after. Yields a dict that receives, on exit
    from an ``"autotune"`` body, ``tuned``: the tile configurations chosen inside (strings)."""
    env = _SWITCHES_OFF | KERNEL_SWITCHES[switch][1]
    saved = {k: os.environ.get(k) for k in env}
    before = set(tuning.tuned_choices())
    found: dict[str, list[str]] = {}
    os.environ.update(env)
    try:
        yield found
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if switch == "autotune":
            found["tuned"] = [str(c) for k, c in tuning.tuned_choices().items() if k not in before]


def switch_check(name: str, switch: str, got: Tensor, ref: Tensor, truth: Tensor) -> dict:
    """The errors of a kernel row: :func:`check_op` (the rule enforced), except under tf32x3,
    where :func:`check_close` allows up to :data:`SWITCH_ERR_LIMIT` and the row records whether
    the rule holds.

    Returns:
        ``rel_err``, ``ref_rel_err`` (None for float64) and, for float32, ``err_ratio``
        (``rel_err`` in units of the rule's: the PyTorch error, at least eps/2) and
        ``meets_2x_rule``.
    """
    if got.dtype == torch.float64 or switch != "tf32x3":
        err, err_ref = check_op(name, got, ref, truth)
    else:
        err, err_ref = check_close(name, got, ref, truth, factor=SWITCH_ERR_LIMIT)
    if err_ref is None:
        return {"rel_err": err, "ref_rel_err": err_ref}
    ratio = err / max(err_ref, torch.finfo(got.dtype).eps / 2)
    return {"rel_err": err, "ref_rel_err": err_ref, "err_ratio": ratio, "meets_2x_rule": ratio <= 2}


def _timed_pair(
    ours: Callable[[], object],
    ref: Callable[[], object],
    *,
    flops: float,
    bytes_: float,
    dtype: torch.dtype,
    device: torch.device,
    sizes: Sizes,
    ceil: dict,
) -> dict:
    """Time ``ours`` and the reference; rates of ours and their fractions of the ceilings."""
    t = time_call(ours, device, sizes.kernel_budget_s)["median_s"]
    t_ref = time_call(ref, device, sizes.kernel_budget_s)["median_s"]
    gbps = bytes_ / t / 1e9
    row = {"ms": t * 1e3, "ref_ms": t_ref * 1e3, "speedup": t_ref / t, "GBps": gbps}
    row["bw_frac"] = gbps / ceil["copy_GBps"] if ceil.get("copy_GBps") else None
    if flops:
        peak = ceil.get("fp64_TFLOPs" if dtype == torch.float64 else "fp32_TFLOPs")
        row["TFLOPs"] = flops / t / 1e12
        row["flop_frac"] = row["TFLOPs"] / peak if peak else None
    return row


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def scaled_linear_case(
    B: int, n_in: int, n_out: int, transpose: bool, *, device, sizes, ceil, switch: str = "default"
) -> dict:
    """``kernels.scaled_linear`` (tangents, or cotangents with ``transpose``) of B·K rows, under
    the speed switch ``switch`` (a key of :data:`KERNEL_SWITCHES`)."""
    torch.manual_seed(0)
    f32 = {"device": device, "dtype": torch.float32}
    M = B * sizes.K
    X = torch.randn(B, sizes.K, n_out if transpose else n_in, **f32)
    W = torch.randn(n_out, n_in, **f32) / n_in**0.5
    S = torch.rand(B, n_out, **f32)
    with switched(switch) as tuned:
        got = kernels.scaled_linear(X, W, S, transpose=transpose)
        ref = kernel_reference.scaled_linear(X, W, S, transpose=transpose)
        truth = kernel_reference.scaled_linear(
            X.double(), W.double(), S.double(), transpose=transpose
        )
        errors = switch_check("scaled_linear", switch, got, ref, truth)
        timed = _timed_pair(
            lambda: kernels.scaled_linear(X, W, S, transpose=transpose),
            lambda: kernel_reference.scaled_linear(X, W, S, transpose=transpose),
            flops=2 * M * n_in * n_out,
            bytes_=4 * (M * (n_in + n_out) + n_in * n_out + B * n_out),
            dtype=torch.float32,
            device=device,
            sizes=sizes,
            ceil=ceil,
        )
    return {**errors, **timed, **tuned}


def coupling_case(
    B: int,
    P: int,
    op: str,
    *,
    device,
    sizes,
    ceil,
    m: int | None = None,
    packed: bool | None = None,
) -> dict:
    """One direction of the coupling step (``coupling_tangent`` or ``coupling_cotangent``)
    with P parameters per transformed feature, m of them (default ``sizes.m``); ``packed``
    chooses the kernel's programs (see :mod:`rnf_fast.kernels.coupling`; None: its default)."""
    torch.manual_seed(0)
    f32 = {"device": device, "dtype": torch.float32}
    m, M = sizes.m if m is None else m, B * sizes.K
    dy_dx, dy_dtheta = torch.rand(B, m, **f32), torch.randn(B, m, P, **f32)
    dx_t, dtheta = torch.randn(B, sizes.K, m, **f32), torch.randn(B, sizes.K, m, P, **f32)
    args = (
        (dx_t, dtheta, dy_dx, dy_dtheta) if op == "coupling_tangent" else (dx_t, dy_dx, dy_dtheta)
    )
    kernel, ref = getattr(kernels, op), getattr(kernel_reference, op)
    if packed is not None and kernels.triton_available() and device.type == "cuda":
        from rnf_fast.kernels import coupling as coupling_kernels  # imports Triton

        kernel = functools.partial(getattr(coupling_kernels, op), packed=packed)
    runs = ((kernel, args), (ref, args), (ref, tuple(x.double() for x in args)))
    outs = [_as_tuple(f(*a)) for f, a in runs]
    errs = [check_close(op, g, r, t) for g, r, t in zip(*outs)]
    timed = _timed_pair(
        lambda: kernel(*args),
        lambda: ref(*args),
        flops=0,
        bytes_=4 * (2 * M * m + M * m * P + B * m * (P + 1)),  # the two directions move as much
        dtype=torch.float32,
        device=device,
        sizes=sizes,
        ceil=ceil,
    )
    return {
        "rel_err": max(e for e, _ in errs),
        "ref_rel_err": max(e for _, e in errs),
        **timed,
    }


def gram_case(
    ops,
    B: int,
    dtype: torch.dtype,
    *,
    device,
    sizes,
    ceil,
    d: int | None = None,
    switch: str = "default",
) -> dict:
    """A backend's ``gram`` of B Jacobians (D × d, d default ``sizes.d``), under the speed
    switch ``switch`` (a key of :data:`KERNEL_SWITCHES`)."""
    if ops.gram is reference.gram:
        raise SkipCase("this backend's gram is the reference's")
    torch.manual_seed(0)
    D, d = sizes.D, sizes.d if d is None else d
    J = torch.randn(B, d, D, device=device, dtype=dtype).transpose(1, 2)
    with switched(switch) as tuned:
        truth = reference.gram(J.double())
        errors = switch_check("gram", switch, ops.gram(J), reference.gram(J), truth)
        timed = _timed_pair(
            lambda: ops.gram(J),
            lambda: reference.gram(J),
            flops=2 * B * D * d * d,
            bytes_=J.element_size() * (B * D * d + B * d * d),
            dtype=dtype,
            device=device,
            sizes=sizes,
            ceil=ceil,
        )
    return {**errors, **timed, **tuned}


def _spd(N: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """N random SPD systems (eigenvalues in about [0.5, 5]) and right-hand sides."""
    G = torch.randn(N, d, d, dtype=torch.float64, device=device)
    A = G @ G.transpose(1, 2) / d + 0.5 * torch.eye(d, dtype=torch.float64, device=device)
    return A.to(dtype), torch.randn(N, d, dtype=dtype, device=device)


CG_TOL = {torch.float32: 1e-3, torch.float64: 1e-6}
"""Tolerances of the CG verification solves. float32 at 1e-3 is far above its floor (~1e-6
relative here), where a rounding difference inside a kernel seldom moves a system's stopping
step (CPU extension, N = 1,024, d = 16: 0-1 systems at 1e-3, about 90 at 1e-5, 160 at 1e-6)."""


def _cg_solve(update, logquad, A: Tensor, b: Tensor, tol: float):
    """d CG steps from the zero guess with ``update``, then the Lanczos log-quadrature."""
    state = reference.cg_init(b, b.shape[1])
    for _ in range(b.shape[1]):
        update(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), tol)
    return state, logquad(state.alphas, state.betas, state.steps, state.bb)


def _logquad_truth(A: Tensor, b: Tensor) -> Tensor:
    """bᵀ log(A) b per system from the eigendecomposition (float64 in, float64 out)."""
    lam, Q = torch.linalg.eigh(A)
    c = (Q.transpose(1, 2) @ b.unsqueeze(-1)).squeeze(-1)
    return (c * c * torch.log(lam)).sum(-1)


def verify_cg(ops, name: str, A: Tensor, b: Tensor) -> dict:
    """Solve A x = b with the backend's ``cg_update`` and with the reference's, at
    :data:`CG_TOL`; check x and the log-quadrature value (each run's own ``lanczos_logquad``)
    against the float64 truth by :func:`check_close`; float64 also needs the reference's
    stopping step in every system. Returns the errors and the number of systems whose steps
    differ."""
    tol = CG_TOL[A.dtype]
    got, got_q = _cg_solve(ops.cg_update, ops.lanczos_logquad, A, b, tol)
    ref, ref_q = _cg_solve(reference.cg_update, reference.lanczos_logquad, A, b, tol)
    differ = int((got.steps != ref.steps).sum())
    if A.dtype == torch.float64 and differ:
        raise AssertionError(f"cg_update ({name}): {differ} float64 systems stop at another step")
    A64, b64 = A.double(), b.double()
    err, err_ref = check_close("cg_update x", got.x, ref.x, torch.linalg.solve(A64, b64))
    q_err, q_err_ref = check_close("lanczos_logquad", got_q, ref_q, _logquad_truth(A64, b64))
    return {
        "tol": tol,
        "steps_differ": differ,
        "mean_steps": float(ref.steps.float().mean()),
        "rel_err": err,
        "ref_rel_err": err_ref,
        "logquad_rel_err": q_err,
        "logquad_ref_rel_err": q_err_ref,
    }


def cg_update_case(ops, name: str, B: int, dtype: torch.dtype, *, device, sizes, ceil) -> dict:
    """A backend's fused CG step for N = B·K systems of size d, verified by a full solve."""
    if ops.cg_update is reference.cg_update:
        raise SkipCase("this backend's cg_update is the reference's")
    reason = _extension_reason(device) if name == "cpp" else None
    if reason is not None:
        raise SkipCase(reason)
    torch.manual_seed(0)
    N, d = B * sizes.K, sizes.d
    A, b = _spd(N, d, dtype, device)
    checked = verify_cg(ops, name, A, b)
    base = reference.cg_init(b, 1)
    Ap = (A @ base.p.unsqueeze(-1)).squeeze(-1)

    def timed(update):
        # One step from the same state every call: p, rᵀr and the flags are restored first
        # (with A p fixed, a drifting p meets pᵀAp <= 0 and most systems go inactive within
        # ten calls, and a kernel that skips inactive systems would look fast). tol = 0 keeps
        # them active; the restore is timed and counted for both.
        state = base.clone()

        def run():
            state.it = 0
            state.p.copy_(base.p)
            state.rr.copy_(base.rr)
            state.active.fill_(True)
            update(state, Ap, 0.0)

        return run

    esize = A.element_size()
    measured = _timed_pair(
        timed(ops.cg_update),
        timed(reference.cg_update),
        flops=0,
        # The step: p, Ap read twice, x, r read and written, p rewritten (9 N·d); the restore
        # of p (2 N·d).
        bytes_=esize * N * d * 11,
        dtype=dtype,
        device=device,
        sizes=sizes,
        ceil=ceil,
    )
    return {**checked, **measured}


def _extension_reason(device: torch.device) -> str | None:
    """Why the extension's kernels do not run on ``device`` here, or None."""
    reason = cpp_backend.unavailable_reason()
    if reason is not None:
        return reason
    from rnf_fast import _C

    if device.type == "cuda" and not _C.WITH_CUDA:
        return "rnf_fast._C was built without CUDA: the cpp backend runs the reference there"
    return None


def extension_case(
    op: str, B: int, dtype: torch.dtype, *, device, sizes, ceil, backend: str = "cpp"
) -> dict:
    """One op of the extension's kernels for N = B·K systems of size d against the reference:
    ``cholesky_logdet``, ``cholesky_inverse`` or ``lanczos_logquad`` (its coefficients from a
    reference CG solve at :data:`CG_TOL`), through the ``"cpp"`` backend (``rnf_fast._C``) or
    the ``"cupy"`` backend (the same device code compiled by NVRTC)."""
    module = {"cpp": cpp_backend, "cupy": cupy_backend}[backend]
    reason = _extension_reason(device) if backend == "cpp" else module.unavailable_reason()
    if reason is not None:
        raise SkipCase(reason)
    torch.manual_seed(0)
    N, d = B * sizes.K, sizes.d
    A, b = _spd(N, d, dtype, device)
    esize = A.element_size()
    ours, ref = getattr(module, op), getattr(reference, op)
    if op == "cholesky_logdet":
        args: tuple = (A,)
        L, logdet, _, info = ours(A)
        if bool((info != 0).any()):
            raise AssertionError(f"cholesky_logdet: {int((info != 0).sum())} SPD systems failed")
        L_ref, logdet_ref, _, _ = ref(A)
        L_true, logdet_true, _, _ = ref(A.double())
        err, err_ref = check_op("cholesky_logdet L", L, L_ref, L_true)
        q_err, q_err_ref = check_op("cholesky_logdet logdet", logdet, logdet_ref, logdet_true)
        errors = {"rel_err": err, "ref_rel_err": err_ref}
        errors |= {"logdet_rel_err": q_err, "logdet_ref_rel_err": q_err_ref}
        bytes_ = esize * N * (2 * d * d + 2)
    elif op == "cholesky_inverse":
        L = reference.cholesky_logdet(A)[0]
        args = (L,)
        err, err_ref = check_op(op, ours(L), ref(L), ref(L.double()))
        errors = {"rel_err": err, "ref_rel_err": err_ref}
        bytes_ = esize * N * 2 * d * d
    elif op == "lanczos_logquad":
        state, _ = _cg_solve(reference.cg_update, reference.lanczos_logquad, A, b, CG_TOL[dtype])
        args = (state.alphas, state.betas, state.steps, state.bb)
        truth = ref(*(x.double() if x.is_floating_point() else x for x in args))
        err, err_ref = check_op(op, ours(*args), ref(*args), truth)
        errors = {"rel_err": err, "ref_rel_err": err_ref}
        bytes_ = esize * N * (2 * d + 2) + 8 * N
    else:
        raise ValueError(f"op must be an extension op, got {op!r}")
    timed = _timed_pair(
        lambda: ours(*args),
        lambda: ref(*args),
        flops=0,
        bytes_=bytes_,
        dtype=dtype,
        device=device,
        sizes=sizes,
        ceil=ceil,
    )
    return {**errors, **timed}


EXTENSION_OPS = ("cholesky_logdet", "cholesky_inverse", "lanczos_logquad")
GRAM_SWITCHES = {
    torch.float32: ("default", "tf32x3", "autotune"),
    torch.float64: ("default", "autotune", "cublas"),
}
"""The speed switches timed for the Triton backend's gram, per dtype."""


def _switch_impl(impl: str, switch: str) -> str:
    """The ``impl`` of a row: ``impl``, then the switch's environment (or "switches off")."""
    return f"{impl}, {KERNEL_SWITCHES[switch][0]}"


DTYPES = (torch.float32, torch.float64)


def run_kernels(log: SectionLog, device: torch.device, sizes: Sizes, ceil: dict) -> None:
    """The kernels section (see the module docstring)."""
    on_chip = device.type == "cuda" and kernels.triton_available()
    kernel_impl = "triton" if on_chip else "torch reference (no Triton kernel on this device)"
    common = {"device": device, "sizes": sizes, "ceil": ceil}
    h, D, d = sizes.hidden, sizes.D, sizes.d
    for B in sizes.kernel_batches:
        M = B * sizes.K
        # Each shape with the defaults, then with each float32 speed switch that ships off.
        for transpose, n_in, n_out in ((False, h, h), (True, h, h), (False, h, D)):
            direction = "cotangent" if transpose else "tangent"
            for switch in ("default", "tf32x3", "autotune"):
                log.run(
                    {
                        "case": f"scaled_linear {direction} {M}x{n_in}x{n_out}",
                        "op": "scaled_linear",
                        "impl": _switch_impl(kernel_impl, switch),
                        "switch": switch,
                        "dtype": "float32",
                        "B": B,
                    },
                    functools.partial(
                        scaled_linear_case, B, n_in, n_out, transpose, switch=switch, **common
                    ),
                )
        for P in (2, 23):
            for op in ("coupling_tangent", "coupling_cotangent"):
                log.run(
                    {
                        "case": f"{op} P={P} {M}x{sizes.m}",
                        "op": op,
                        "impl": kernel_impl,
                        "dtype": "float32",
                        "B": B,
                    },
                    functools.partial(coupling_case, B, P, op, **common),
                )
        # A tabular flow's coupling (m = 21 features, MINIBOONE's half): one row per program
        # against rows packed into each program (off by default until measured here).
        for packed in (False, True):
            for op in ("coupling_tangent", "coupling_cotangent"):
                log.run(
                    {
                        "case": f"{op} P=2 {M}x21",
                        "op": op,
                        "impl": f"{kernel_impl}{', packed' if packed else ''}",
                        "dtype": "float32",
                        "B": B,
                    },
                    functools.partial(coupling_case, B, 2, op, m=21, packed=packed, **common),
                )
        # The cupy backend too where it can run, although "auto" skips it beside a CUDA _C:
        # its rows beside the cpp backend's, each against the reference.
        names = available_backends(device)
        cupy_usable = cupy_backend.unavailable_reason() is None
        if device.type == "cuda" and "cupy" not in names and cupy_usable:
            names.append("cupy")
        for name in names:
            if name == "torch":
                continue  # the reference itself
            ops = get_backend(name, device)[1]
            for dtype in DTYPES:
                dname = str(dtype).removeprefix("torch.")
                base = {"impl": f"{name} backend", "dtype": dname, "B": B}
                log.run(
                    {**base, "case": f"gram {dname} B={B} D={D} d={d}", "op": "gram"},
                    functools.partial(gram_case, ops, B, dtype, **common),
                )
                log.run(
                    {**base, "case": f"cg_update {dname} N={M} d={d}", "op": "cg_update"},
                    functools.partial(cg_update_case, ops, name, B, dtype, **common),
                )
        # The Triton backend's gram with its switches, at the latent sizes of the log det
        # section (d = 16, 64 on CUDA): float32 IEEE against tf32x3, fixed against autotuned
        # tiles; float64 on Triton (fixed, autotuned) against cuBLAS.
        gram_impl = "triton backend" if on_chip else kernel_impl
        for gram_d in dict.fromkeys((d, 4 * d)):
            for dtype, switches in GRAM_SWITCHES.items():
                dname = str(dtype).removeprefix("torch.")
                for switch in switches:
                    log.run(
                        {
                            "case": f"gram {dname} B={B} D={D} d={gram_d}",
                            "op": "gram",
                            "impl": _switch_impl(gram_impl, switch),
                            "switch": switch,
                            "dtype": dname,
                            "B": B,
                        },
                        functools.partial(
                            gram_case, kernels, B, dtype, d=gram_d, switch=switch, **common
                        ),
                    )
        impls = {"cpp": "cpp backend (rnf_fast._C)", "cupy": "cupy backend (NVRTC)"}
        if device.type != "cuda" or not cupy_usable:
            del impls["cupy"]
        for op in EXTENSION_OPS:
            for dtype in DTYPES:
                dname = str(dtype).removeprefix("torch.")
                for backend, impl in impls.items():
                    log.run(
                        {
                            "case": f"{op} {dname} N={M} d={d}",
                            "op": op,
                            "impl": impl,
                            "dtype": dname,
                            "B": B,
                        },
                        functools.partial(extension_case, op, B, dtype, backend=backend, **common),
                    )


# ---------------------------------------------------------------------------------------------
# Section: logdet
# ---------------------------------------------------------------------------------------------

GPYTORCH = "gpytorch linear_cg K=1 (rnf_fast matvec)"
SPEEDUP_REFERENCES = {"jacfwd": JACFWD, "official": OFFICIAL, "jacrev": JACREV}
CHECK_TOL = 1e-7  # CG tolerance of the full-probe checks (up to 10·d iterations)


@functools.cache
def gpytorch_linear_cg() -> tuple[Callable | None, str | None]:
    """GPyTorch's batched CG solver (``linear_operator.utils.linear_cg``), or None and the
    reason it cannot be imported."""
    try:
        import gpytorch  # noqa: F401  (the solver ships with it, in linear_operator)
        from linear_operator.utils.linear_cg import linear_cg
    except Exception as exc:  # ImportError, or a version that does not load with this torch
        return None, f"gpytorch is not importable here ({type(exc).__name__}: {exc})"
    return linear_cg, None


def gpytorch_cg_term(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    probes: int | Tensor,
    tol: float,
    max_iter: int,
) -> tuple[Tensor, dict]:
    """The log det gradient with GPyTorch's CG as the solver: u_k = (JᵀJ)⁻¹ v_k by
    ``linear_cg`` on all B·K systems (matvec Jᵀ(J v) from :func:`rnf_fast.linearize`), then
    the surrogate (2/K) Σ_k ⟨stopgrad(J u_k), J v_k⟩, whose gradient is that of log det(JᵀJ)
    in expectation over the probes.

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d) latents, requiring grad.
        probes: K Rademacher probes per sample, or a (B, K, d) tensor with E[v vᵀ] = I.
        tol: ``linear_cg``'s tolerance (on the mean relative residual; it runs at least
            min(10, max_iter - 1) iterations).
        max_iter: its iteration cap.

    Returns:
        (B,) zeros carrying the gradient estimate, and ``{"matvecs": ...}``.
    """
    linear_cg, reason = gpytorch_linear_cg()
    if linear_cg is None:
        raise SkipCase(reason)
    B, d = z.shape
    if isinstance(probes, Tensor):
        V = probes.to(z)
    else:
        V = make_probes(B, probes, d, kind="rademacher", dtype=z.dtype, device=z.device)
    K = V.shape[1]
    lin = rnf_fast.linearize(decoder, z)
    calls = [0]

    def matmul(X: Tensor) -> Tensor:  # (B, d, K) -> A X
        calls[0] += 1
        return lin.gram_mv(X.transpose(1, 2).contiguous())[1].transpose(1, 2)

    with torch.no_grad(), warnings.catch_warnings():
        # Its NumericalWarning when max_iter ends a solve before the tolerance.
        warnings.simplefilter("ignore")
        U = linear_cg(
            matmul, V.transpose(1, 2), tolerance=tol, max_iter=max_iter, max_tridiag_iter=max_iter
        )
    JU = lin.jvp(U.transpose(1, 2).contiguous())
    JV = lin.jvp(V, create_graph=True)
    S = (2.0 / K) * (JU.detach() * JV).sum((1, 2))
    return S - S.detach(), {"matvecs": calls[0]}


def _gpytorch_fn(decoder, z, encoder):
    d = z.shape[1]
    return gpytorch_cg_term(decoder, z, probes=1, tol=DEFAULT_CG_TOL, max_iter=d)


def logdet_contenders(device: torch.device) -> dict[str, harness.Contender]:
    """The suite's contenders for the device (:func:`harness.suite_contenders`)
    and GPyTorch's CG with rnf_fast's matvec (at rnf_fast's default tolerance, K = 1,
    at most d iterations)."""
    out = dict(harness.suite_contenders(device.type))
    out[GPYTORCH] = harness.Contender("gpytorch", _gpytorch_fn, has_value=False)
    return out


@dataclass
class LogdetSetup:
    """A log det case ready to run: the timing problem (batch B), the verification problem
    (the truth batch; the same object when it is B) and its float64 truth on the device."""

    timing: harness.Problem
    verify: harness.Problem
    truth_value: Tensor  # (B_verify,) float64
    truth_grad: Tensor  # float64, flattened over [*params, z]
    truth_s: float
    encoders: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    activation_bytes: int | None = None

    def encoder(self, which: str) -> Callable[[Tensor], Tensor]:
        """The FIF encoder of the ``"timing"`` or ``"verify"`` problem, built once."""
        if which not in self.encoders:
            self.encoders[which] = problem_encoder(getattr(self, which))
        return self.encoders[which]


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def float64_truth(problem: harness.Problem) -> tuple[Tensor, Tensor]:
    """log det(JᵀJ) and its gradient over ``[*problem.params, problem.z]`` in float64, on the
    problem's device, from a float64 copy of its float32 decoder at its float32 z (the exact
    answer to the question the float32 contenders are asked): dense forward-mode J, slogdet,
    autograd.

    Returns:
        ((B,) values, the flattened gradient).
    """
    if problem.model is not None:
        model64 = copy.deepcopy(problem.model).double()
        decoder64 = harness.flow_decoder(model64)
        params64 = list(model64.f.parameters())
    else:
        decoder64 = copy.deepcopy(problem.decoder).double()
        params64 = list(decoder64.parameters())
    shapes = [tuple(p.shape) for p in problem.params]
    if [tuple(p.shape) for p in params64] != shapes:
        raise AssertionError("the float64 copy's parameters do not match problem.params")
    z64 = problem.z.detach().double().requires_grad_(True)
    J = dense_jacobian(decoder64, z64)
    value = torch.linalg.slogdet(J.transpose(1, 2) @ J)[1]
    return value.detach(), _flat(grads(value, [*params64, z64]))


def setup_case(case: LogdetCase, device: torch.device) -> LogdetSetup:
    """Build the case's problems on the device and the float64 truth of its verification
    batch."""
    spec = harness.PROBLEMS[case.problem]
    B = spec.B if case.B is None else case.B
    Bv = case.verify_batch or spec.verify_batch or min(B, 256)
    dev = str(device)
    timing = harness.make_problem(case.problem, d=case.d, batch=B, truth=False, device=dev)
    verify = (
        timing
        if Bv == B
        else harness.make_problem(case.problem, d=case.d, batch=Bv, truth=False, device=dev)
    )
    t0 = time.perf_counter()
    value, grad = float64_truth(verify)
    sync(device)
    return LogdetSetup(timing, verify, value, grad, time.perf_counter() - t0)


def _step(
    problem: harness.Problem,
    contender: harness.Contender,
    encoder: Callable | None,
    stats: dict,
) -> Callable[[], Tensor]:
    """A training-step closure: zero grads, the term, backward; the contender's stats of the
    last call go into ``stats``."""

    def step() -> Tensor:
        for p in problem.params:
            p.grad = None
        problem.z.grad = None
        value, info = contender.fn(problem.decoder, problem.z, encoder)
        value.sum().backward()
        stats.update(info)
        return value.detach()

    return step


def _flat_grads(problem: harness.Problem) -> Tensor:
    tensors = [*problem.params, problem.z]
    return _flat([torch.zeros_like(t) if t.grad is None else t.grad for t in tensors])


def verify_contender(setup: LogdetSetup, name: str, contender: harness.Contender) -> dict:
    """One step on the verification batch against the float64 truth, then the check its
    method promises (see the module docstring).

    Returns:
        The single-step errors (``value_rel_err``, ``grad_rel_err``), the check done
        (``check``) and, for the probe-based contenders, the full-probe gradient error
        (``check_grad_rel_err``).

    Raises:
        AssertionError: when an exact contender, rnf_fast CG or GPyTorch's CG misses its bound.
    """
    problem = setup.verify
    encoder = setup.encoder("verify") if contender.kind == "fif" else None
    stats: dict = {}
    value = _step(problem, contender, encoder, stats)()
    out: dict = {
        "value_rel_err": (
            rel_error(value.double(), setup.truth_value) if contender.has_value else None
        ),
        "grad_rel_err": rel_error(_flat_grads(problem), setup.truth_grad),
    }
    tol_v, tol_g = VALUE_TOL, GRAD_TOL
    if contender.kind == "dense" or stats.get("method") == "exact":
        out["check"] = f"exact: value <= {tol_v:.0e}, gradient <= {tol_g:.0e}"
        if not (out["value_rel_err"] <= tol_v and out["grad_rel_err"] <= tol_g):
            raise AssertionError(
                f"{name} disagrees with the float64 truth: value {out['value_rel_err']:.2e}, "
                f"gradient {out['grad_rel_err']:.2e}"
            )
        return out
    B, d = problem.z.shape
    V = d**0.5 * torch.eye(d, dtype=problem.z.dtype, device=problem.z.device).expand(B, d, d)
    strict = True
    with warnings.catch_warnings():
        # With float32 products CG may need more than d steps to reach CHECK_TOL on an
        # ill-conditioned JᵀJ; it may run to 10·d, the gradient bound is the test.
        warnings.filterwarnings("ignore", "CG reached max_iter", RuntimeWarning)
        if stats.get("method") == "cg":
            kw = {k: v for k, v in contender.kwargs.items() if k in ("backend", "batching")}
            check = rnf_fast.logdet_grad(
                problem.decoder,
                problem.z,
                method="cg",
                probes=V,
                tol=CHECK_TOL,
                max_iter=10 * d,
                **kw,
            )
            out["check"] = f"K = d unit probes, CG tol {CHECK_TOL:.0e}: gradient <= {tol_g:.0e}"
        elif contender.kind == "gpytorch":
            check, _ = gpytorch_cg_term(
                problem.decoder, problem.z, probes=V, tol=CHECK_TOL, max_iter=10 * d
            )
            out["check"] = f"K = d unit probes, CG tol {CHECK_TOL:.0e}: gradient <= {tol_g:.0e}"
        elif contender.kind == "official":
            check = logdet_official_cg(problem.decoder, problem.z, probes=V)
            out["check"] = "reported: K = d unit probes at its own CG settings (its CG bias)"
            strict = False
        elif contender.kind == "fif":
            check = logdet_fif(problem.decoder, encoder, problem.z, probes=V)
            out["check"] = "reported: K = d unit probes with its encoder (its bias)"
            strict = False
        else:
            raise ValueError(f"no check for contender kind {contender.kind!r} ({name})")
    err = rel_error(_flat(grads(check, [*problem.params, problem.z])), setup.truth_grad)
    out["check_grad_rel_err"] = err
    if strict and not err <= tol_g:
        raise AssertionError(f"{name}: full-probe gradient off the truth by {err:.2e}")
    return out


def _clear_grads(problem: harness.Problem) -> None:
    for p in problem.params:
        p.grad = None
    problem.z.grad = None


def _activation_bytes(problem: harness.Problem, device: torch.device) -> int:
    """CUDA memory one forward pass with its autograd graph holds, at the problem's batch."""
    _clear_grads(problem)
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = problem.decoder(problem.z)
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _check_dense_fits(setup: LogdetSetup, name: str, device: torch.device) -> None:
    """Skip an autodiff Jacobian that would not fit: vmap(jacrev) pushes D cotangents and
    vmap(jacfwd) d tangents through the graph, each about one forward's activations; twice
    that (the graph of the slogdet backward) must fit in 90% of the free memory."""
    if device.type != "cuda":
        return
    if setup.activation_bytes is None:
        setup.activation_bytes = _activation_bytes(setup.timing, device)
    spec = setup.timing.spec
    n = spec.D if name == JACREV else spec.d
    need = 2 * n * setup.activation_bytes
    free = torch.cuda.mem_get_info(device)[0]
    if need > 0.9 * free:
        raise SkipCase(
            f"would not fit: about {need / 2**30:.0f} GiB (2 x {n} directions x "
            f"{setup.activation_bytes / 2**20:.0f} MiB of activations) > 90% of the free "
            f"{free / 2**30:.0f} GiB"
        )


def _peak_mib(step: Callable[[], Tensor], problem, device: torch.device) -> float | None:
    """CUDA memory one step adds at its peak (None on the CPU: torch does not track it)."""
    if device.type != "cuda":
        return None
    _clear_grads(problem)
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


STAT_KEYS = ("method", "backend", "batching", "matvecs", "cg_iterations", "cg_unconverged")


def logdet_case(
    setup: LogdetSetup,
    name: str,
    contender: harness.Contender,
    device: torch.device,
    sizes: Sizes,
) -> dict:
    """Verify one contender on a case, then time its training step and measure its peak."""
    if contender.kind == "gpytorch" and gpytorch_linear_cg()[0] is None:
        raise SkipCase(gpytorch_linear_cg()[1])
    try:
        if contender.kind == "dense":
            _check_dense_fits(setup, name, device)
        checked = verify_contender(setup, name, contender)
        encoder = setup.encoder("timing") if contender.kind == "fif" else None
        stats: dict = {}
        step = _step(setup.timing, contender, encoder, stats)
        t = time_call(step, device, sizes.step_budget_s, warmup=1)  # verification warmed it
        peak = _peak_mib(step, setup.timing, device)
    except torch.cuda.OutOfMemoryError as exc:
        if contender.kind != "dense":
            raise
        raise SkipCase(f"out of memory: {str(exc).splitlines()[0]}") from None
    return {
        **checked,
        "ms": t["median_s"] * 1e3,
        "p20_ms": t["p20_s"] * 1e3,
        "p80_ms": t["p80_s"] * 1e3,
        "reps": t["reps"],
        "peak_MiB": peak,
        **{k: stats[k] for k in STAT_KEYS if k in stats},
    }


def _release(device: torch.device) -> None:
    """Return what is no longer referenced (a failed attempt's graph) to CUDA. (A full
    collection costs about 0.1 s with torch loaded: not after every row.)"""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def add_speedups(rows: list[dict]) -> None:
    """Speed-ups of each measured row over the references of its case (None where the
    reference was not measured)."""
    ms = {r["contender"]: r["ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        for key, ref in SPEEDUP_REFERENCES.items():
            r[f"speedup_vs_{key}"] = ms[ref] / r["ms"] if ref in ms else None


def run_logdet(log: SectionLog, device: torch.device, sizes: Sizes) -> None:
    """The logdet section (see the module docstring)."""
    _register_problems()
    contenders = logdet_contenders(device)
    for case in sizes.logdet:
        spec = harness.PROBLEMS[case.problem]
        d = spec.d if case.d is None else case.d
        B = spec.B if case.B is None else case.B
        base = {
            "case": f"{case.problem} d={d} B={B}",
            "problem": case.problem,
            "about": spec.about,
            "d": d,
            "D": spec.D,
            "B": B,
        }
        t0 = time.perf_counter()
        try:
            setup = setup_case(case, device)
        except Exception as exc:
            log.add_failed(
                {**base, "contender": "setup (problems, float64 truth)"},
                exc,
                time.perf_counter() - t0,
            )
            _release(device)
            continue
        base |= {"verify_batch": setup.verify.spec.B, "truth_s": setup.truth_s}
        rows = []
        for name, contender in contenders.items():
            row_base = {**base, "contender": name, "kind": contender.kind}
            row = log.run(
                row_base, functools.partial(logdet_case, setup, name, contender, device, sizes)
            )
            rows.append(row)
            _clear_grads(setup.timing)
            _clear_grads(setup.verify)
            if row["status"] != "ok":
                _release(device)  # an exception's frames may hold a graph in a cycle
        add_speedups(rows)
        log.write()
        del setup
        _release(device)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _fmt(v: object, spec: str = ".3g") -> str:
    if v is None or v == "":
        return "–"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _ms(v: float | None) -> str:
    """Milliseconds with three significant digits, without exponents."""
    if v is None:
        return "–"
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def _status(row: dict) -> str:
    if row["status"] == "skipped":
        return f"skipped: {row.get('reason', '')}"
    return row["status"]


def _table(headers: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def ceilings_markdown(data: dict) -> list[str]:
    return _table(
        ["ceiling", "value", "unit", "status"],
        [[r["case"], _fmt(r.get("value")), r["unit"], _status(r)] for r in data["rows"]],
    )


def _ceilings_line(ceil: dict) -> str:
    return (
        f"Ceilings: copy {_fmt(ceil.get('copy_GBps'), '.0f')} GB/s, float32 matmul "
        f"{_fmt(ceil.get('fp32_TFLOPs'), '.1f')} TFLOP/s (no TF32), float64 matmul "
        f"{_fmt(ceil.get('fp64_TFLOPs'), '.1f')} TFLOP/s."
    )


def kernels_markdown(data: dict) -> list[str]:
    lines = [
        _ceilings_line(data.get("ceilings", {}))
        + f" ({data.get('ceilings_source', 'source unknown')})",
        "",
    ]
    cells = []
    for r in data["rows"]:
        cells.append(
            [
                r["case"],
                r.get("impl", ""),
                _status(r),
                _fmt(r.get("ms"), ".4f"),
                _fmt(r.get("ref_ms"), ".4f"),
                _fmt(r.get("speedup"), ".2f"),
                _fmt(r.get("GBps"), ".1f"),
                _fmt(r.get("bw_frac"), ".2f"),
                _fmt(r.get("TFLOPs"), ".2f"),
                _fmt(r.get("flop_frac"), ".2f"),
                _fmt(r.get("rel_err"), ".1e"),
                _fmt(r.get("ref_rel_err"), ".1e"),
                _fmt(r.get("err_ratio"), ".2f"),
                _fmt(r.get("steps_differ")),
            ]
        )
    headers = ["case", "impl", "status", "ms", "ref ms", "speed-up", "GB/s", "of copy"]
    headers += ["TFLOP/s", "of matmul", "rel. err", "ref rel. err", "err / ref (rule: <= 2)"]
    headers += ["CG steps differ"]
    return lines + _table(headers, cells)


def logdet_markdown(data: dict) -> list[str]:
    by_case: dict[str, list[dict]] = {}
    for r in data["rows"]:
        by_case.setdefault(r["case"], []).append(r)
    lines: list[str] = []
    for case, rows in by_case.items():
        first = rows[0]
        lines += [
            f"**{case}** (D={first.get('D')}; {first.get('about', '')}; float64 truth on "
            f"B={_fmt(first.get('verify_batch'))}, {_fmt(first.get('truth_s'), '.1f')} s)",
            "",
        ]
        cells = []
        for r in rows:
            spread = "–"
            if r.get("p20_ms") is not None:
                spread = f"{_ms(r['p20_ms'])}–{_ms(r['p80_ms'])}"
            cells.append(
                [
                    r.get("contender", ""),
                    _status(r),
                    _ms(r.get("ms")),
                    spread,
                    _fmt(r.get("peak_MiB"), ".1f"),
                    _fmt(r.get("speedup_vs_jacfwd"), ".2f"),
                    _fmt(r.get("speedup_vs_official"), ".2f"),
                    _fmt(r.get("speedup_vs_jacrev"), ".1f"),
                    _fmt(r.get("value_rel_err"), ".1e"),
                    _fmt(r.get("grad_rel_err"), ".1e"),
                    _fmt(r.get("check_grad_rel_err"), ".1e"),
                    _fmt(r.get("matvecs")),
                    _fmt(r.get("cg_iterations"), ".1f"),
                ]
            )
        headers = ["contender", "status", "ms", "p20–p80 ms", "peak MiB", "× jacfwd"]
        headers += ["× official", "× jacrev", "value err", "grad err", "full-probe grad err"]
        headers += ["matvecs", "CG iters"]
        lines += _table(headers, cells) + [""]
    return lines


def graph_cg_markdown(data: dict) -> list[str]:
    """The graph-CG section: the step and the solve alone per mode, against the eager CG."""
    headers = ["mode", "status", "graph", "matvecs", "step ms", "× eager", "solve ms", "× eager"]
    lines = []
    for r in data["rows"]:
        if r["status"] != "ok":
            continue
        lines.append(
            [
                r["mode"],
                r["status"],
                _fmt(r.get("graph")),
                _fmt(r.get("matvecs")),
                _ms(r.get("step_ms")),
                _fmt(r.get("speedup_vs_eager"), ".2f"),
                _ms(r.get("solve_ms")),
                _fmt(r.get("solve_speedup_vs_eager"), ".2f"),
            ]
        )
    return _table(headers, lines)


def run_graph_cg(log: SectionLog, device: torch.device, quick: bool) -> None:
    """The graph_cg section: :func:`gpu_graph_cg.graph_cg_rows` (verified, then timed)."""
    from gpu_graph_cg import graph_cg_rows

    for row in graph_cg_rows(device, quick):
        log.add({"case": f"graph_cg {row.get('mode', '')}".strip(), **row})


MARKDOWN = {
    "ceilings": ceilings_markdown,
    "kernels": kernels_markdown,
    "logdet": logdet_markdown,
    "graph_cg": graph_cg_markdown,
}


def section_markdown(data: dict) -> str:
    """The Markdown of one section's JSON: its table(s) and its failed cases."""
    state = "complete" if data.get("complete") else "INCOMPLETE (stopped before the end)"
    lines = [
        f"## {data['section']}",
        "",
        f"{data.get('mode')}{', quick' if data.get('quick') else ''}; {len(data['rows'])} "
        f"rows in {_fmt(data.get('seconds'), '.0f')} s; {state}.",
        "",
        *MARKDOWN[data["section"]](data),
    ]
    failed = [r for r in data["rows"] if r["status"] == "failed"]
    if failed:
        lines += ["", "Failed:", ""]
        lines += [f"- {_label(r)}: {r.get('error', '')}" for r in failed]
    return "\n".join(lines).rstrip() + "\n"


def _label(row: dict) -> str:
    return " | ".join(str(row[k]) for k in ("case", "impl", "contender") if row.get(k))


def report(out_dir: Path) -> Path:
    """Write ``out_dir/summary.md`` from the section JSON files there: the machine, the
    precision settings, one part per section and every failed case.

    Returns:
        The path written.

    Raises:
        FileNotFoundError: when ``out_dir`` holds no section JSON.
    """
    sections = []
    for name in SECTIONS:
        path = out_dir / f"bench_{name}.json"
        if path.exists():
            sections.append(json.loads(path.read_text()))
    if not sections:
        raise FileNotFoundError(f"no bench_<section>.json in {out_dir}")
    info = sections[0].get("machine", {})
    where = (
        f"GPU {info.get('gpu')}"
        if sections[0].get("device") == "cuda"
        else f"CPU mode (tiny sizes: checks the script, not a chip): {info.get('cpu')}"
    )
    precision = sections[0].get("precision", {})
    lines = [
        f"# rnf_fast GPU benchmark: {where}",
        "",
        f"Machine: CPU {info.get('cpu')}, {info.get('threads')} threads; GPU "
        f"{info.get('gpu') or 'none'}; torch {info.get('torch')}, Triton "
        f"{info.get('triton') or 'none'}, extension "
        f"{'built' if info.get('extension') else 'absent'}, backends {info.get('backends')}; "
        f"Python {info.get('python')}; commit "
        f"{info.get('commit')}.",
        "",
        "Precision: " + ", ".join(f"{k} = {v}" for k, v in precision.items()) + ".",
        "",
    ]
    failed = []
    for data in sections:
        lines += [section_markdown(data), ""]
        failed += [(data["section"], r) for r in data["rows"] if r["status"] == "failed"]
    lines += ["## Failed cases", ""]
    lines += [f"- {s}: {_label(r)}: {r.get('error', '')}" for s, r in failed] or ["None."]
    path = out_dir / "summary.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def run_section(
    section: str, device: torch.device, quick: bool, out_dir: Path, precision: dict
) -> SectionLog:
    """Run one section, writing ``out_dir/bench_<section>.json`` as it goes."""
    sizes = SIZES[(device.type, quick)]
    mode = "cuda" if device.type == "cuda" else "cpu (tiny sizes: checks the script, not a chip)"
    header = {
        "device": device.type,
        "mode": mode,
        "quick": quick,
        "precision": precision,
        "machine": harness.machine_info(),
        "sizes": asdict(sizes),
    }
    torch.manual_seed(0)
    if section == "kernels":
        ceil, source = load_ceilings(out_dir, device, sizes)
        header |= {"ceilings": ceil, "ceilings_source": source}
    log = SectionLog(out_dir, section, header)
    if section == "ceilings":
        run_ceilings(log, device, sizes)
    elif section == "kernels":
        run_kernels(log, device, sizes, header["ceilings"])
    elif section == "graph_cg":
        run_graph_cg(log, device, quick)
    else:
        run_logdet(log, device, sizes)
    log.finish()
    print("\n" + section_markdown(log.data), flush=True)
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--section", choices=[*SECTIONS, "all"], help="what to run")
    what.add_argument("--report", type=Path, metavar="DIR", help="write DIR/summary.md")
    parser.add_argument("--quick", action="store_true", help="one small case per kind")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, metavar="DIR", help="results folder (--section)")
    args = parser.parse_args(argv)
    if args.report is not None:
        try:
            print(f"wrote {report(args.report)}")
        except FileNotFoundError as exc:
            parser.error(str(exc))
        return 0
    if args.out is None:
        parser.error("--section needs --out DIR")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device("cuda" if use_cuda else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    precision = pin_precision()
    sections = SECTIONS if args.section == "all" else (args.section,)
    failed = 0
    for section in sections:
        failed += len(run_section(section, device, args.quick, args.out, precision).failed)
    if failed:
        print(f"{failed} case(s) failed: see the JSON in {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
