"""Preconditioned CG on the MNIST-preset image flow: iterations and step time against exact.

On image flows CG tends to run all d iterations (ill-conditioned JᵀJ) and then costs what the
exact method costs. This study takes a trained run of the MNIST preset (`rnf-fast train
--dataset mnist5k --method cg --run-dir RUN`), its decoder at z = g†(x) of held-out batches
(B = 32, the preset's), and measures for each preconditioner the CG iterations per system,
the batched matvecs, the share of systems that meet the tolerance (1e-2, Rademacher, K = 1),
and the time of a log-det training step (value + backward), interleaved with the exact
method's step. Preconditioners: none, ``jacobi`` (diag JᵀJ, d extra tangents), ``batch`` (the
mean JᵀJ of 4 rows), ``cached`` (the previous batch's mean JᵀJ, which a trainer would keep from
an earlier step: its cost is not in the step time); and, for comparison, no preconditioner with
randomized truncation (``Roulette(8, 0.5)``).

    .venv/bin/python bench/study_precond_image.py RUN [--batches 4] [--rounds 5]

Writes bench/results/precond_image.md and .json. One thread, a quiet machine for the times;
the iteration counts do not depend on the load.
"""

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.measure import machine_info  # noqa: E402
from study_precond import mean_gram  # noqa: E402

from rnf_fast import CG, Exact, Roulette, logdet_grad  # noqa: E402
from rnf_fast.runs import _load_data, _load_run, _prepare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
B = 32
NAMES = ("none", "jacobi", "batch", "cached", "none, Roulette(8, 0.5)")
DRAWS = torch.Generator().manual_seed(1)
"""The truncation's draws (one stream for the whole study, so its J varies as in training)."""


def _options(name, cached):
    probes = torch.sign(
        torch.randn(B, 1, cached.shape[0], generator=torch.Generator().manual_seed(0))
    )
    if name.startswith("none, Roulette"):
        truncation = Roulette(min_iter=8, continue_prob=0.5)
        return CG(probes=probes, tol=1e-2, truncation=truncation, generator=DRAWS)
    prec = {"none": None, "jacobi": "jacobi", "batch": "batch", "cached": cached}[name]
    return CG(probes=probes, tol=1e-2, preconditioner=prec)


def _step(decoder, z, method):
    zr = z.detach().requires_grad_(True)
    value = logdet_grad(decoder, zr, method)
    value.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a trained run folder of the MNIST preset")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    config, model, st = _load_run(args.run)
    model = model.eval()
    ds = _load_data(config)
    x = _prepare(ds.test, ds, st, seed=7)
    with torch.no_grad():
        zs = [model.encode(x[i * B : (i + 1) * B]) for i in range(args.batches + 1)]
    decoder = model.decoder
    counts = {n: {"iterations": [], "matvecs": [], "converged": []} for n in NAMES}
    times = {n: [] for n in (*NAMES, "exact")}
    for i in range(1, args.batches + 1):
        z, cached = zs[i], mean_gram(decoder, zs[i - 1])
        for name in NAMES:
            _, info = logdet_grad(decoder, z, _options(name, cached), return_info=True)
            counts[name]["iterations"].append(info.cg.iterations.double().mean().item())
            counts[name]["matvecs"].append(info.cg.matvecs)
            counts[name]["converged"].append(info.cg.converged.double().mean().item())
        for _ in range(args.rounds):
            for name in (*NAMES, "exact"):
                method = Exact() if name == "exact" else _options(name, cached)
                start = time.perf_counter()
                _step(decoder, z, method)
                times[name].append(time.perf_counter() - start)
    d = zs[0].shape[1]
    exact_ms = 1e3 * statistics.median(times["exact"])
    rows = {}
    for name in NAMES:
        c = counts[name]
        rows[name] = {
            "iterations": statistics.mean(c["iterations"]),
            "matvecs": statistics.mean(c["matvecs"]),
            "converged": statistics.mean(c["converged"]),
            "step_ms": 1e3 * statistics.median(times[name]),
        }
    lines = [
        f"Trained MNIST-preset flow (d = {d}, D = 784; `{config['train'].get('method')}` run of "
        f"{config['train'].get('epochs')} epochs), {args.batches} test batches of B = {B}, CG at "
        "tol 1e-2 with one Rademacher probe: mean iterations per system, batched matvecs (the "
        "slowest system), the share of systems that meet the tolerance, and the median time "
        f"of a log-det step (value + backward, {args.rounds} rounds per batch, interleaved with "
        f"exact: {exact_ms:.0f} ms). `cached`: the previous batch's mean JᵀJ; the last row is no "
        "preconditioner with randomized truncation (unbiased for the tol-1e-2 iterate, more "
        "variance: README, Choosing CG's tolerance).\n",
        "| preconditioner | iterations | matvecs | converged | step ms | × exact |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['iterations']:.2f} | {r['matvecs']:.2f} | {r['converged']:.0%} "
            f"| {r['step_ms']:.0f} | {r['step_ms'] / exact_ms:.2f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    record = {"machine": machine_info(), "d": d, "B": B, "exact_ms": exact_ms, "rows": rows}
    (RESULTS / "precond_image.json").write_text(json.dumps(record, indent=1))
    (RESULTS / "precond_image.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
