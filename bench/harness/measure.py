"""Measurement: the suite's cells timed within a budget, the peak memory of a step, the machine.

:func:`run_suite` runs every (problem, contender) cell of a suite and the study over d through
:func:`run_case`: each cell is verified (:func:`harness.contenders.verify`), its step time
estimated from small batches, then timed or skipped within its share of the budget.
:func:`peak_memory` is the one memory probe: the resident high-water mark a step adds, in a
fresh process per problem on the CPU (``max_memory_allocated`` on CUDA, in process).
:func:`machine_info` is :func:`rnf_fast.machine.machine_info` plus the checkout's commit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from rnf_fast.machine import machine_info as _rnf_machine_info

from .contenders import (
    STUDY_CONTENDERS,
    Contender,
    contenders,
    step_closure,
    suite_contenders,
    verify,
)
from .problems import PROBLEMS, STUDY_D, SUITES, Problem, make_problem, problem_encoder

__all__ = [
    "MAX_ROUNDS",
    "MIN_ROUNDS",
    "STUDY_SHARE",
    "SUITE_BUDGET_S",
    "cuda_peak",
    "machine_info",
    "peak_memory",
    "percentile",
    "resident_peak",
    "run_case",
    "run_suite",
]

REPO = Path(__file__).resolve().parents[2]
"""The checkout this harness lives in (bench/harness/ -> the repository root)."""

SUITE_BUDGET_S = {"standard": 900.0, "quick": 0.0}
"""Seconds the suite's cells share (0: quick mode, no timing). The standard suite's 900 s plus
building the problems with their float64 truths and the memory processes (about 3 minutes)
fit 20 minutes on 2 CPU cores; a cell whose estimated cost exceeds its share is skipped with
that estimate."""

MIN_ROUNDS, MAX_ROUNDS = 3, 20
STUDY_SHARE = 0.25  # of the budget, for the d-study


def _git_commit(root: Path) -> str:
    """The checked-out commit (short hash), read from ``.git`` without running git; "unknown"
    outside a checkout. ``RNF_FAST_COMMIT`` overrides it, for a copy of the tree whose ``.git``
    is not the one the files came from (a machine the tree was synced to)."""
    if os.environ.get("RNF_FAST_COMMIT"):
        return os.environ["RNF_FAST_COMMIT"][:9]
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:9]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:9]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:9]
    except OSError:
        pass
    return "unknown"


def machine_info() -> dict[str, object]:
    """The machine and software a measurement ran on (:func:`rnf_fast.machine.machine_info`)
    and the commit of this checkout (``"commit"``)."""
    return {**_rnf_machine_info(), "commit": _git_commit(REPO)}


def percentile(data: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of ``data``, linear between order statistics."""
    xs = sorted(data)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """The resident high-water mark of this process (VmHWM). Unlike ru_maxrss, which Linux
    carries over from the parent across fork and exec, it belongs to this address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def _reset_hwm() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def resident_peak(step: Callable[[], object]) -> int:
    """Resident memory (bytes) ``step()`` adds at its peak in this process: the high-water mark
    (reset first) above the resident set before the call. Linux only; counts blocks that leave
    the resident set when freed only when malloc serves them by mmap (see :func:`peak_memory`).
    """
    _reset_hwm()
    before = _rss_bytes()
    step()
    return max(_hwm_bytes() - before, 0)


def cuda_peak(step: Callable[[], object]) -> int:
    """CUDA memory (bytes) ``step()`` allocates at its peak above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - base, 0)


def _memory_child(argv: list[str]) -> None:
    """The fresh process of :func:`peak_memory`: ``PROBLEM D|- CONTENDER...``; prints one JSON
    line per contender measured."""
    problem_name, d_arg, *names = argv
    d = None if d_arg == "-" else int(d_arg)
    torch.set_num_threads(int(os.environ.get("RNF_BENCH_THREADS", torch.get_num_threads())))
    tiny = make_problem(problem_name, d=d, truth=False, batch=1)
    problem = make_problem(problem_name, d=d, truth=False)
    registry = contenders("cpu")
    encoders: dict[str, Callable | None] = {"tiny": None, "full": None}
    for name in names:
        contender = registry[name]
        if contender.kind == "fif" and encoders["full"] is None:
            encoders = {"tiny": problem_encoder(tiny), "full": problem_encoder(problem)}
        fif = contender.kind == "fif"
        # Load every code path on one sample first.
        step_closure(tiny, contender, encoders["tiny"] if fif else None)()
        peak = resident_peak(step_closure(problem, contender, encoders["full"] if fif else None))
        print(json.dumps({"contender": name, "peak_bytes": peak}), flush=True)


_CHILD = "import sys; from harness.measure import _memory_child; _memory_child(sys.argv[1:])"


def peak_memory(problem_name: str, names: list[str], *, d: int | None = None) -> dict[str, int]:
    """Peak resident memory (bytes) one training step of each contender adds, on the CPU.

    One fresh process per problem measures the contenders in turn: for each, a step on one
    sample loads its code paths, then the resident high-water mark (VmHWM) is reset, the
    resident set noted, one full step run, and the mark above that reported
    (:func:`resident_peak`). glibc's malloc serves every block over 128 KiB by mmap
    (``MALLOC_MMAP_THRESHOLD_``), so what a step frees leaves the resident set at once and
    earlier contenders do not hide a later one's peak. (A process per cell would cost its ~5 s
    of imports per cell.) CPU allocations are not tracked by torch, so this is the honest peak
    there. The child imports from this process's ``sys.path`` (the same rnf_fast and harness).
    Contenders measured before a crash of the process (e.g. out of memory) keep their
    numbers; the others are missing. Linux only.

    Arguments:
        problem_name: a key of :data:`harness.problems.PROBLEMS`.
        names: contender names from :func:`harness.contenders.contenders`.
        d: another latent dimension (the d-study).

    Returns:
        Contender name to peak bytes.
    """
    if problem_name not in PROBLEMS:
        raise ValueError(f"problem_name must be one of {sorted(PROBLEMS)}, got {problem_name!r}")
    cmd = [sys.executable, "-P", "-c", _CHILD, problem_name, "-" if d is None else str(d), *names]
    # This process's sys.path ("" is the working directory), the harness's folder first.
    path = [str(REPO / "bench"), *(os.path.abspath(p or os.curdir) for p in sys.path)]
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "PYTHONPATH": os.pathsep.join(path),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    peaks = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            peaks[row["contender"]] = int(row["peak_bytes"])
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        warnings.warn(
            f"the memory process of {problem_name} exited with {out.returncode} after "
            f"{len(peaks)} of {len(names)} contenders: {last}",
            RuntimeWarning,
            stacklevel=2,
        )
    return peaks


# ---------------------------------------------------------------------------------------------
# The suite's cells
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample_seconds(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn``, one sample: CUDA events on
    CUDA (the queue is timed, not the host), the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _timed(step: Callable[[], tuple[Tensor, dict]], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - t0


def _sub_batch(problem: Problem, b: int) -> Problem:
    return replace(problem, z=problem.z[:b].detach().requires_grad_(True))


def _estimate(
    problem: Problem, contender: Contender, encoder: Callable | None, share_s: float
) -> tuple[float, int]:
    """Estimate the step time at the full batch B from steps at batches 1, 4, 16, … .

    Each size is timed once (the first twice, to leave first-call costs out). From two sizes
    on, the time is extrapolated as affine in the batch, t(b) = t₀ + c·b, through the last two
    (a per-call overhead plus a per-sample cost; never below the last measured time). The
    ramp stops at B, or when the next size (at most 4 times the last time) could take more
    than half of ``share_s``; from a single size the estimate is proportional to B.

    Returns:
        (estimated seconds per step at B, the largest batch measured).
    """
    B = problem.spec.B
    device = problem.z.device
    points: list[tuple[int, float]] = []
    b = 1
    while True:
        b = min(b, B)
        step = step_closure(_sub_batch(problem, b), contender, encoder)
        if not points:
            step()
        points.append((b, _timed(step, device)))
        if b == B:
            return points[-1][1], B
        t = points[-1][1]
        if len(points) >= 2:
            (b1, t1), (b2, t2) = points[-2:]
            est = t + max((t2 - t1) / (b2 - b1), 0.0) * (B - b)
        else:
            est = t * B / b  # proportional to b until a second size is measured
        # The next size costs at most 4 t: refine while that stays within half the share.
        if 4 * t > share_s / 2:
            return est, b
        b *= 4


def _cached_problems(cache: dict, problem_name: str, d: int | None, device: str) -> dict:
    """The timing problem (full batch, no truth) and the truth problem (verification batch)
    of a cell, built once per (problem, d, device) in ``cache``."""
    key = (problem_name, d, device)
    if key not in cache:
        spec = PROBLEMS[problem_name]
        cache[key] = {
            "timing": make_problem(problem_name, d=d, truth=False, device=device),
            "truth": make_problem(problem_name, d=d, batch=spec.verify_batch, device=device),
        }
    return cache[key]


def run_case(
    problem_name: str,
    contender_name: str,
    *,
    share_s: float | None,
    d: int | None = None,
    device: str = "cpu",
    memory: bool = True,
    cache: dict | None = None,
) -> dict:
    """Verify, measure and time one (problem, contender) cell.

    With ``share_s=None`` (quick mode) the contender is verified and run once at full size,
    with no estimate and one timed step (peak memory only if ``memory``). Otherwise: estimate
    the step time (:func:`_estimate`); skip the cell, recording the estimate, if
    ``MIN_ROUNDS`` + 2 steps would exceed ``share_s``; else verify on the truth batch, measure
    peak memory (a fresh process on the CPU, ``max_memory_allocated`` on CUDA), and time as
    many rounds as the share allows (``MIN_ROUNDS`` to ``MAX_ROUNDS``).

    Arguments:
        problem_name, contender_name: keys of :data:`PROBLEMS` and
            :func:`harness.contenders.contenders`.
        share_s: seconds this cell may take (None: quick mode; 0 skips after the estimate).
        d: another latent dimension (the d-study).
        device: ``"cpu"`` or ``"cuda"``.
        memory: measure peak memory (on the CPU a fresh process for this cell alone;
            :func:`run_suite` measures all the cells of a problem in one process instead).
        cache: a dict reused across calls to keep built problems and encoders.

    Returns:
        A row of the suite JSON.
    """
    contender = contenders(device)[contender_name]
    problems = _cached_problems({} if cache is None else cache, problem_name, d, device)
    timing, truth = problems["timing"], problems["truth"]
    if contender.kind == "fif":
        for which in ("timing", "truth"):
            if which + "_encoder" not in problems:
                problems[which + "_encoder"] = problem_encoder(problems[which])
    enc_t, enc_v = problems.get("timing_encoder"), problems.get("truth_encoder")
    spec = timing.spec
    row: dict = {
        "problem": problem_name,
        "contender": contender_name,
        "kind": contender.kind,
        "d": spec.d,
        "D": spec.D,
        "B": spec.B,
        "status": "ok",
    }
    started = time.perf_counter()
    dev = timing.z.device
    if share_s is not None:
        est, from_b = _estimate(timing, contender, enc_t, share_s)
        row.update(estimate_s=est, estimate_from_batch=from_b)
        if est * (MIN_ROUNDS + 2) > share_s:
            row["status"] = "skipped"
            return row
    row.update(verify(truth, contender_name, contender, enc_v), verify_batch=truth.spec.B)
    step = step_closure(timing, contender, enc_t)
    first = _timed(step, dev)
    _, stats = step()
    row.update({k: v for k, v in stats.items()})
    if memory:
        if dev.type == "cuda":
            row["peak_bytes"] = cuda_peak(step)
        else:
            peaks = peak_memory(problem_name, [contender_name], d=d)
            if contender_name in peaks:
                row["peak_bytes"] = peaks[contender_name]
    if share_s is None:
        row["times_s"] = [first]
    else:
        left = share_s - (time.perf_counter() - started)
        rounds = int(min(max(left / max(first, 1e-9), MIN_ROUNDS), MAX_ROUNDS))
        row["times_s"] = [_timed(step, dev) for _ in range(rounds)]
    times = row["times_s"]
    row.update(
        median_s=percentile(times, 0.5),
        p20_s=percentile(times, 0.2),
        p80_s=percentile(times, 0.8),
        rounds=len(times),
    )
    return row


def _crossover(rows: list[dict], fast: str, slow: str) -> int | None:
    """The smallest d from which ``fast`` has the lower median step time than ``slow``."""
    times = {(r["contender"], r["d"]): r.get("median_s") for r in rows if r["status"] == "ok"}
    ds = sorted({r["d"] for r in rows})
    for d in ds:
        a, b = times.get((fast, d)), times.get((slow, d))
        if a is not None and b is not None and a < b:
            return d
    return None


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep the suite usable without it
        return None
    return tqdm(total=total, disable=not enabled, unit="cell", dynamic_ncols=True)


def run_suite(
    size: str = "standard",
    *,
    device: str = "cpu",
    budget_s: float | None = None,
    progress: bool = True,
    problems: list[str] | None = None,
    study: bool = True,
) -> dict:
    """Run the benchmark suite and return its JSON-ready results.

    Every (problem, contender) cell of ``SUITES[size]`` and the exact-vs-CG study over d
    (``STUDY_D[size]``) runs through :func:`run_case`. The budget (``SUITE_BUDGET_S[size]`` by
    default) is split: ``STUDY_SHARE`` to the study, the rest evenly over the problems and then
    over the cells, each cell's share being what is left of its pool over the cells left
    (so time a fast cell does not use goes to the later ones); quick mode (budget 0) verifies
    every cell and runs it once.

    Arguments:
        size: ``"standard"`` or ``"quick"``.
        device: ``"cpu"`` or ``"cuda"``.
        budget_s: override the measurement budget in seconds.
        progress: show a progress bar on stderr.
        problems: run only these problems (default: the suite's).
        study: include the d-study.

    Returns:
        ``{"suite", "size", "device", "budget_s", "elapsed_s", "machine_info", "rows",
        "study_d"}``.
    """
    if size not in SUITES:
        raise ValueError(f"size must be one of {sorted(SUITES)}, got {size!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    budget = SUITE_BUDGET_S[size] if budget_s is None else float(budget_s)
    names = list(suite_contenders(device))
    problem_names = SUITES[size] if problems is None else problems
    base, ds = STUDY_D[size]
    total = len(problem_names) * len(names) + (len(ds) * len(STUDY_CONTENDERS) if study else 0)
    bar = _progress(total, progress)
    started = time.perf_counter()
    measure = budget > 0
    in_process = measure and device == "cuda"  # else one process per problem, after its cells
    main_budget = budget * (1 - STUDY_SHARE) if study else budget
    rows: list[dict] = []
    study_rows: list[dict] = []
    # Seconds left in each pool and cells left to share them: what a fast cell leaves unused
    # goes to the cells after it.
    pools = {"main": [main_budget, len(problem_names) * len(names)]}
    jobs = [(pname, None, names, "main", rows) for pname in problem_names]
    if study:
        pools["study"] = [budget * STUDY_SHARE, len(ds) * len(STUDY_CONTENDERS)]
        jobs += [(base, d, list(STUDY_CONTENDERS), "study", study_rows) for d in ds]
    for pname, d, cnames, pool, out in jobs:
        cache: dict = {}
        # Building the problem and its float64 truth is set-up, outside the cells' budget.
        _cached_problems(cache, pname, d, device)
        done = []
        for cname in cnames:
            if bar is not None:
                where = pname if d is None else f"d-study d={d}"
                bar.set_description(f"{where} | {cname}")
            left, cells = pools[pool]
            # An exhausted pool still gives each cell its estimate (then a skip).
            share = max(left, 0.0) / cells if budget > 0 else None
            t0 = time.perf_counter()
            done.append(
                run_case(
                    pname,
                    cname,
                    share_s=share,
                    d=d,
                    device=device,
                    memory=in_process,
                    cache=cache,
                )
            )
            pools[pool] = [left - (time.perf_counter() - t0), cells - 1]
            if bar is not None:
                bar.update()
        if measure and not in_process:
            ok = [r["contender"] for r in done if r["status"] == "ok"]
            peaks = peak_memory(pname, ok, d=d) if ok else {}
            for r in done:
                if r["contender"] in peaks:
                    r["peak_bytes"] = peaks[r["contender"]]
        out.extend(done)
    if bar is not None:
        bar.close()
    return {
        "suite": "rnf_fast",
        "size": size,
        "device": device,
        "budget_s": budget,
        "elapsed_s": time.perf_counter() - started,
        "machine_info": machine_info(),
        "rows": rows,
        "study_d": {
            "problem": base,
            "ds": list(ds),
            "rows": study_rows,
            "crossover": {
                "cg K=1 faster than exact from d": _crossover(
                    study_rows, "rnf_fast cg K=1", "rnf_fast exact"
                ),
                "cg K=4 faster than exact from d": _crossover(
                    study_rows, "rnf_fast cg K=4", "rnf_fast exact"
                ),
            },
        },
    }
