"""Exact vs CG as the latent dimension d grows, at fixed D = 784 (MLP decoder, B = 64).

    python bench/study_d.py [--size quick|standard] [--out bench/results] [--plots docs]

Time and peak memory per training step of rnf_fast exact, CG with K = 1 and 4, the
forward-mode Jacobian and the official code's algorithm, for d = 2 … 128; each cell verified
against the float64 truth first. Writes suite_study_d_SIZE.json and .md, and the plots
bench_SIZE_d_time.png and bench_SIZE_d_memory.png with the crossovers marked. The same study
is part of ``rnf-fast bench``; this script runs it alone (a quarter of the suite's budget).
"""

import argparse
import json
from pathlib import Path

from harness import SUITE_BUDGET_S, markdown, plots, run_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["standard", "quick"], default="standard")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and table")
    parser.add_argument("--plots", default=None, help="folder for the plots (default: --out)")
    args = parser.parse_args()
    results = run_suite(args.size, problems=[], budget_s=SUITE_BUDGET_S[args.size], progress=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"suite_study_d_{args.size}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"suite_study_d_{args.size}.md").write_text(markdown(results))
    for path in plots(results, args.plots or out, prefix=f"bench_{args.size}"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
