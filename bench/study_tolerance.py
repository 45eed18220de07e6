"""Does CG's stopping rule change what training reaches? Final NLL and reconstruction per rule.

The gradient study (``bench/study_cg_tol.py``) measures the bias of each stopping rule against
the Hutchinson noise of one step; bias does not average out over a run while noise does. This
study trains with each rule and compares what the runs end at: on ``digits`` (d = 10, its preset:
40 epochs) and ``mnist5k`` (d = 20, its preset: 8 epochs), each rule over the same seeds, one job
at a time per core with one thread. Rules: exact (the reference), CG at the default tolerance
1e-2, a looser tolerance 1e-1, at most 3 iterations, randomized truncation (unbiased for the
tol-1e-2 iterate, :class:`rnf_fast.engine.truncation.Roulette`), and for context the same
training without the log det (how much the log det moves the result at all).

    python bench/study_tolerance.py --seeds 0 1 2 --jobs 1 > bench/results/tolerance.md

A finished run (``results.json``) is reused; an interrupted one resumes from its checkpoint.
Run folders: ``runs/tolerance/DATASET-RULE-seedN``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DATASETS = ("digits", "mnist5k")

# slug -> (name in the table, rnf-fast train flags, train config overrides)
RULES: dict[str, tuple[str, list[str], dict]] = {
    "exact": ("exact", ["--method", "exact"], {}),
    "tol1e-2": ("cg, tol 1e-2 (default)", ["--method", "cg"], {}),
    "tol1e-1": ("cg, tol 1e-1", ["--method", "cg"], {"cg_tol": 0.1}),
    "max3": ("cg, at most 3 iterations", ["--method", "cg"], {"cg_max_iter": 3}),
    "roulette": (
        "cg, roulette(4, 0.5), tol 1e-2",
        ["--method", "cg"],
        {"cg_truncation": {"min_iter": 4, "continue_prob": 0.5}},
    ),
    "nologdet": ("without the log det (context)", ["--objective", "ml-no-logdet"], {}),
}


def _run(dataset: str, slug: str, seed: int, root: Path) -> dict:
    run = root / f"{dataset}-{slug}-seed{seed}"
    results = run / "results.json"
    if not results.exists():
        run.parent.mkdir(parents=True, exist_ok=True)
        config = root / f"{slug}.json"
        config.write_text(json.dumps({"train": RULES[slug][2]}))
        cmd = [sys.executable, "-m", "rnf_fast.cli", "train", "--dataset", dataset]
        cmd += [*RULES[slug][1], "--config", str(config), "--seed", str(seed)]
        cmd += ["--threads", "1", "--run-dir", str(run), "--no-progress"]
        if (run / "checkpoint.pt").exists():
            cmd = [sys.executable, "-m", "rnf_fast.cli", "train", "--run-dir", str(run)]
            cmd += ["--resume", "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(run.parent / f"{run.name}.log", "w") as out:
            subprocess.run(cmd, check=True, env=env, stdout=out, stderr=subprocess.STDOUT)
    out = json.loads(results.read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    matvecs = [r["train_cg_matvecs"] for r in records if "train_cg_matvecs" in r]
    out["matvecs"] = statistics.mean(matvecs) if matvecs else None
    out["minutes"] = sum(r.get("seconds", 0.0) for r in records) / 60
    return out


def _mean_se(values: list[float]) -> str:
    m = statistics.mean(values)
    if len(values) < 2:
        return f"{m:.3f}"
    return f"{m:.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def report(rows: dict) -> str:
    lines = [
        "**CG's stopping rule over whole training runs.** Each dataset's preset budget; one "
        "thread per job. Test NLL (nats, the dataset's units) "
        "and reconstruction MSE: mean ± standard error over the seeds; Δ NLL: the paired "
        "difference to the default rule on the same seed (same initialisation and data order). "
        "matvecs: CG's batched products per training step with the log det (mean over the run); "
        "train min: the epochs' wall time with up to two jobs and other work sharing the 2 "
        "cores (indicative only; step_cost.py times steps on a quiet machine). "
        "Reproduce: `python bench/study_tolerance.py --datasets DATASET --seeds ...` (the seeds "
        "of each section), then `--report-only` for this file.",
        "",
    ]
    for dataset in DATASETS:
        by_rule = rows.get(dataset)
        if not by_rule:
            continue
        seeds = sorted({s for by_seed in by_rule.values() for s in by_seed})
        lines += [f"#### {dataset} (seeds {', '.join(map(str, seeds))})", ""]
        lines += ["| rule | test NLL | Δ NLL vs default | recon MSE | matvecs | train min |"]
        lines += ["|---|---:|---:|---:|---:|---:|"]
        base = by_rule.get("tol1e-2", {})
        for slug, by_seed in by_rule.items():
            nll = [r["nll"] for r in by_seed.values()]
            recon = [r["recon_error"] for r in by_seed.values()]
            deltas = [by_seed[s]["nll"] - base[s]["nll"] for s in by_seed if s in base]
            mv = [r["matvecs"] for r in by_seed.values() if r["matvecs"] is not None]
            minutes = statistics.mean(r["minutes"] for r in by_seed.values())
            delta = _mean_se(deltas) if slug != "tol1e-2" and deltas else "–"
            matvecs = f"{statistics.mean(mv):.2f}" if mv else "–"
            lines.append(
                f"| {RULES[slug][0]} | {_mean_se(nll)} | {delta} | "
                f"{statistics.mean(recon):.3e} | {matvecs} | {minutes:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--rules", nargs="+", choices=sorted(RULES), default=list(RULES))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (1 thread each)")
    parser.add_argument("--root", default="runs/tolerance", help="parent of the run folders")
    parser.add_argument(
        "--report-only", action="store_true", help="report every finished run under --root"
    )
    args = parser.parse_args()
    root = Path(args.root)
    if args.report_only:
        rows: dict = {}
        for ds in DATASETS:
            for slug in RULES:
                for results in sorted(root.glob(f"{ds}-{slug}-seed*/results.json")):
                    seed = int(results.parent.name.rsplit("-seed", 1)[1])
                    rows.setdefault(ds, {}).setdefault(slug, {})[seed] = _run(ds, slug, seed, root)
        print(report(rows))
        return
    tasks = [(ds, slug, s) for ds in args.datasets for slug in args.rules for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: _run(*t, root), tasks))
    rows: dict = {}
    for (ds, slug, seed), r in zip(tasks, results, strict=True):
        rows.setdefault(ds, {}).setdefault(slug, {})[seed] = r
    print(report(rows))


if __name__ == "__main__":
    main()
