"""How long ``import rnf_fast`` and ``rnf-fast --help`` take next to ``import torch``.

Each round starts a fresh interpreter per command, in a random order, so all of them see the
same machine load; the report gives medians over the rounds and their ratios to torch. The
goal for the library (issue: import within 1.3x of torch) is judged on these ratios.

    .venv/bin/python bench/import_time.py [--rounds 15] [--out bench/results/import_time.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness.measure import machine_info  # noqa: E402

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import rnf_fast": [sys.executable, "-c", "import rnf_fast"],
    "import rnf_fast + first logdet_grad": [
        sys.executable,
        "-c",
        "import torch, rnf_fast\n"
        "rnf_fast.logdet_grad(torch.nn.Linear(2, 4), torch.randn(3, 2), method='exact')",
    ],
    "rnf-fast --help": [sys.executable, "-m", "rnf_fast.cli", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="fresh interpreters per command")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/import_time.json")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    rng = random.Random(0)
    for _ in range(args.rounds):
        order = list(COMMANDS)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            subprocess.run(COMMANDS[name], env=env, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["import torch"])
    rows = {
        name: {"median_s": statistics.median(t), "x_torch": statistics.median(t) / base, "runs": t}
        for name, t in times.items()
    }
    record = {"machine": machine_info(), "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)
    print(f"{'command':40s} {'median s':>9s} {'x torch':>8s}")
    for name, row in rows.items():
        print(f"{name:40s} {row['median_s']:9.3f} {row['x_torch']:8.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
