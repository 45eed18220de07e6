"""Quality bars of rectangular flows, over seeds: train, evaluate, tabulate every seed and medians.

    python bench/quality.py vonmises  --seeds 0 1 2 --jobs 2   # exact and cg against the entropy
    python bench/quality.py embedded  --seeds 0 1 2 --jobs 2   # ML, TS, ML without log det
    python bench/quality.py digits    --seeds 0 --jobs 1

Each run is ``rnf-fast train`` with the suite's flags in its own process and run folder
(``runs/quality/SUITE/NAME-seedN``; a finished run is reused). Results go to
``bench/results/quality_SUITE.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name -> rnf-fast train flags (the dataset preset supplies the rest).
SUITES: dict[str, dict[str, list[str]]] = {
    "vonmises": {
        "exact": ["--dataset", "vonmises", "--method", "exact"],
        # Rademacher probes (the default) have v² = 1, so with d = 1 CG's estimate is exact;
        # Gaussian ones show what Hutchinson noise does to training.
        "cg K=1": ["--dataset", "vonmises", "--method", "cg", "--probes", "1"],
        "cg K=1 (Gaussian probes)": [
            "--dataset",
            "vonmises",
            "--method",
            "cg",
            "--probes",
            "1",
            "--probe-kind",
            "gaussian",
        ],
    },
    "embedded": {
        "ML (exact)": ["--dataset", "embedded-sphere", "--objective", "ml", "--method", "exact"],
        "TS": ["--dataset", "embedded-sphere", "--objective", "ts"],
        "ML without log det": ["--dataset", "embedded-sphere", "--objective", "ml-no-logdet"],
    },
    "digits": {
        "ML (cg K=1)": ["--dataset", "digits", "--objective", "ml", "--method", "cg"],
    },
}

COLUMNS = [
    ("nll", "test NLL (nats)", "{:.4f}"),
    ("nll_gap", "NLL − entropy", "{:+.4f}"),
    ("recon_error", "recon MSE / coord", "{:.2e}"),
    ("recon_sq", "recon ‖x−x̂‖²", "{:.2e}"),
    ("frechet", "sample Fréchet", "{:.4f}"),
    ("sample_manifold_distance", "sample dist. to manifold", "{:.2e}"),
    ("train_seconds", "train s", "{:.0f}"),
]


def _run(suite: str, name: str, flags: list[str], seed: int, root: Path) -> dict:
    slug = "".join(c if c.isalnum() or c in "=-" else "_" for c in name).strip("_")
    run = root / suite / f"{slug}-seed{seed}"
    results = run / "results.json"
    if not results.exists():
        cmd = [
            sys.executable,
            "-m",
            "rnf_fast.cli",
            "train",
            *flags,
            "--seed",
            str(seed),
            "--data-seed",
            str(seed),
            "--run-dir",
            str(run),
            "--no-progress",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
        subprocess.run(cmd + resume, check=True, env=env, stdout=subprocess.DEVNULL)
    out = json.loads(results.read_text())
    out["recon_sq"] = out["recon_error"] * out["D"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out["train_seconds"] = sum(json.loads(line).get("seconds", 0.0) for line in lines)
    return out


def _table(rows: dict[str, list[dict]], seeds: list[int]) -> str:
    present = [c for c in COLUMNS if any(c[0] in r for rs in rows.values() for r in rs)]
    head = "| method | seed | " + " | ".join(c[1] for c in present) + " |"
    lines = [head, "|---|---|" + "---:|" * len(present)]
    for name, results in rows.items():
        for seed, r in zip(seeds, results):
            cells = [c[2].format(r[c[0]]) if c[0] in r else "–" for c in present]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
        med = [
            c[2].format(statistics.median(r[c[0]] for r in results)) if c[0] in results[0] else "–"
            for c in present
        ]
        lines.append(f"| **{name}** | median | " + " | ".join(med) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--root", default="runs/quality", help="parent of the run folders")
    args = parser.parse_args()
    root = Path(args.root)
    jobs = [
        (name, flags, seed) for name, flags in SUITES[args.suite].items() for seed in args.seeds
    ]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: _run(args.suite, j[0], j[1], j[2], root), jobs))
    rows: dict[str, list[dict]] = {}
    for (name, _, _), result in zip(jobs, done):
        rows.setdefault(name, []).append(result)
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quality_{args.suite}.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = _table(rows, args.seeds)
    (out / f"quality_{args.suite}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
