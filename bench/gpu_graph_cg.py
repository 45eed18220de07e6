"""GPU benchmark case: the whole CG solve as one CUDA graph against the eager solve.

On the standard problem (bench/harness's ``mlp-16-784``: the tanh MLP 16 -> 256 -> 256 -> 784
in float32, B = 64, K = 1, the default tolerance), it first verifies the answer: with the same
probes, the graphed solve (captured, then replayed) and the eager fixed-iteration solve give the
same value and gradient. Then it times, interleaved, three modes of one ``logdet_grad`` training
step (the term and its backward, CUDA-synchronised), in ms per step:

- ``eager``: the eager solve with the default stopping rule (what a call runs without the graph),
- ``eager-fixed``: the eager solve with ``fixed_iterations=True`` (d iterations, no host sync),
- ``graph``: ``cuda_graph=True`` (d iterations, one replay per step),

and the same three modes of the solve alone (the CG loop with its running image J u: no
linearization, Lanczos value or surrogate). Each row has its times and the speed-ups against
both eager modes; the target of the issue is the graph at >= 2x the eager CG
(``meets_target`` on the graph row, judged on the step).

    python3 bench/gpu_graph_cg.py --device cuda --out bench/results/gpu/graph_cg.json
    python3 bench/gpu_graph_cg.py --device cuda --quick
    python3 bench/gpu_graph_cg.py --device cpu      # tiny smoke run with emulated graphs

:func:`graph_cg_rows` is the case for ``bench/gpu_bench.py``. The eager modes pass
``cuda_graph=False``, so ``RNF_FAST_CG_GRAPH=1`` in the environment does not turn them into
graphs. On the CPU (``--device cpu``) the problem is harness's tiny ``quick`` MLP and the graphs
are :class:`rnf_fast.engine.graph_cg.EmulatedGraphs`: it checks the script, not a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

import rnf_fast
from rnf_fast.engine import graph_cg, stochastic
from rnf_fast.engine.cg import batched_cg
from rnf_fast.engine.checks import linalg_dtype_for
from rnf_fast.engine.options import DEFAULT_CG_TOL
from rnf_fast.engine.precision import engine_region
from rnf_fast.engine.probes import make_probes
from rnf_fast.ops.dispatch import get_backend, use_backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from harness.measure import percentile, sample_seconds, sync  # noqa: E402

MODES = ("eager", "eager-fixed", "graph")
TARGET_SPEEDUP = 2.0
"""The issue's target: the graphed CG step at least this much faster than the eager one."""
GRAD_TOL = 1e-4
"""Largest relative gradient difference between the graphed and the eager fixed-iteration
solves: the same kernels on the same numbers, so 0 is expected; float32 rounding of a
different kernel choice stays far below this."""


def _options(mode: str) -> dict[str, object]:
    return {
        "eager": {"cuda_graph": False},
        "eager-fixed": {"cuda_graph": False, "fixed_iterations": True},
        "graph": {"cuda_graph": True},
    }[mode]


def _term(problem: harness.Problem, mode: str, probes: int | Tensor, **extra) -> tuple:
    """One training step of the term: (value, flat gradient, the CG report)."""
    for t in (*problem.params, problem.z):
        t.grad = None
    value, info = rnf_fast.logdet_grad(
        problem.decoder, problem.z, "cg", probes=probes, return_info=True, **_options(mode), **extra
    )
    value.sum().backward()
    tensors = (*problem.params, problem.z)  # the last bias has no gradient: zeros
    grad = torch.cat(
        [(torch.zeros_like(t) if t.grad is None else t.grad).reshape(-1) for t in tensors]
    )
    return value.detach(), grad, info.cg


def _verify(problem: harness.Problem) -> dict[str, object]:
    """The graphed solve (captured, then replayed) against the eager fixed-iteration solve
    with the same probes; raises where they differ or where the graph did not run."""
    B, d = problem.z.shape
    g = torch.Generator(device=problem.z.device).manual_seed(0)
    V = make_probes(B, 1, d, generator=g, dtype=problem.z.dtype, device=problem.z.device)
    value, grad, _ = _term(problem, "eager-fixed", V)
    statuses = []
    for _ in range(2):
        got_value, got_grad, info = _term(problem, "graph", V)
        statuses.append(info.graph)
    if statuses != ["captured", "replayed"]:
        raise AssertionError(f"the graph did not capture and replay: {statuses}")
    value_error = float((got_value - value).norm() / value.norm())
    grad_error = float((got_grad - grad).norm() / grad.norm())
    if not grad_error <= GRAD_TOL:
        raise AssertionError(
            f"graphed and eager fixed-iteration gradients differ: relative {grad_error:.3g} "
            f"> {GRAD_TOL}"
        )
    return {"value_rel_error_vs_fixed": value_error, "grad_rel_error_vs_fixed": grad_error}


def _solvers(problem: harness.Problem) -> dict[str, Callable[[], object]]:
    """The solve alone in each mode, on the problem's linearization and fresh probes."""
    z = problem.z
    B, d = z.shape
    ldtype = linalg_dtype_for(z, None)
    backend, _ = get_backend(None, z.device)
    lin = rnf_fast.linearize(problem.decoder, z)
    g = torch.Generator(device=z.device).manual_seed(1)
    b = make_probes(B, 1, d, generator=g, dtype=z.dtype, device=z.device).to(ldtype)
    b = b.reshape(B, d)
    settings = {"K": 1, "dtype": ldtype, "autocast": None, "tol": DEFAULT_CG_TOL}
    solve = functools.partial(stochastic._solve, **settings, max_iter=d, backend=backend)

    def eager() -> object:
        product = stochastic._SplitGramProduct(lin, z, None, 1, ldtype)
        tol = DEFAULT_CG_TOL
        return batched_cg(product, b, tol=tol, max_iter=d, backend=backend, on_step=product.step)

    def graph() -> object:
        key = ("bench", *settings.values(), d, backend)
        done = graph_cg.solve_graphed(solve, lin, z, None, b, None, settings=key)
        if done.result is None:
            raise AssertionError(f"the graph did not run: {done.status}")
        return done

    def within(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with use_backend(backend), engine_region(z.device.type), torch.no_grad():
                return fn()

        return run

    return {
        "eager": within(eager),
        "eager-fixed": within(lambda: solve(lin, z, None, b, None)),
        "graph": within(graph),
    }


def _interleaved_ms(
    fns: dict[str, Callable[[], object]], device: torch.device, samples: int, calls: int
) -> dict[str, float]:
    """Median ms per call of each function, sampled round-robin (each sample ``calls`` calls,
    CUDA events on CUDA, the wall clock elsewhere) after three warm-up calls each."""
    for fn in fns.values():
        for _ in range(3):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            times[name].append(1e3 * sample_seconds(fn, device, calls))
    return {name: percentile(ts, 0.5) for name, ts in times.items()}


def _rows(problem: harness.Problem, device: torch.device, quick: bool) -> list[dict]:
    check = _verify(problem)
    B, d = problem.z.shape
    g = torch.Generator(device=device).manual_seed(2)
    reports: dict[str, object] = {}

    def step(mode: str) -> Callable[[], None]:
        def run() -> None:
            reports[mode] = _term(problem, mode, 1, generator=g)[2]

        return run

    samples, calls = (5, 5) if quick else (20, 10)
    if device.type != "cuda":
        samples, calls = 2, 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # max_iter warnings of single draws
        step_ms = _interleaved_ms({m: step(m) for m in MODES}, device, samples, calls)
        solve_ms = _interleaved_ms(_solvers(problem), device, samples, calls)
    rows = []
    for mode in MODES:
        row = {
            "case": "graph_cg",
            "problem": problem.name,
            "B": B,
            "d": d,
            "D": problem.spec.D,
            "K": 1,
            "dtype": str(problem.z.dtype).removeprefix("torch."),
            "mode": mode,
            "status": "ok",
            "graph": reports[mode].graph,
            "matvecs": reports[mode].matvecs,
            "step_ms": step_ms[mode],
            "solve_ms": solve_ms[mode],
        }
        for base in ("eager", "eager-fixed"):
            suffix = base.replace("-", "_")
            row[f"speedup_vs_{suffix}"] = step_ms[base] / step_ms[mode]
            row[f"solve_speedup_vs_{suffix}"] = solve_ms[base] / solve_ms[mode]
        if mode == "graph":
            row |= check
            row["target_speedup"] = TARGET_SPEEDUP
            row["meets_target"] = row["speedup_vs_eager"] >= TARGET_SPEEDUP
        rows.append(row)
    return rows


def graph_cg_rows(device: torch.device, quick: bool) -> list[dict]:
    """The graph-CG case: verified, then timed (see the module docstring).

    Arguments:
        device: where to run; off CUDA, the tiny problem with emulated graphs.
        quick: fewer timing samples.

    Returns:
        One row per mode of :data:`MODES` (``status`` ``"ok"``), or one ``"failed"`` row with
        the error and its traceback.
    """
    name = "mlp-16-784" if device.type == "cuda" else "quick"
    emulate = graph_cg.emulated() if device.type != "cuda" else contextlib.nullcontext()
    t0 = time.perf_counter()
    try:
        with emulate:
            problem = harness.make_problem(name, truth=False, device=str(device))
            rows = _rows(problem, device, quick)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        trace = traceback.format_exc()
        return [{"case": "graph_cg", "problem": name, "status": "failed", "error": error,
                 "traceback": trace}]  # fmt: skip
    finally:
        graph_cg.clear_cache()
    seconds = time.perf_counter() - t0
    return [row | {"seconds": seconds} for row in rows]


def _table(rows: list[dict]) -> str:
    lines = ["mode         status  graph      matvecs  step ms  vs eager  solve ms  vs eager"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"failed: {r['error']}")
            continue
        lines.append(
            f"{r['mode']:<12} {r['status']:<7} {str(r['graph']):<10} {r['matvecs']:>7} "
            f"{r['step_ms']:>8.3f} {r['speedup_vs_eager']:>8.2f}x {r['solve_ms']:>8.3f} "
            f"{r['solve_speedup_vs_eager']:>8.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"cuda or cpu (default {default})")
    parser.add_argument("--quick", action="store_true", help="fewer timing samples")
    parser.add_argument("--out", type=Path, help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = graph_cg_rows(device, args.quick)
    print(_table(rows))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"device": str(device), "quick": args.quick, "torch": torch.__version__}
        args.out.write_text(json.dumps(data | {"rows": rows}, indent=1) + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
