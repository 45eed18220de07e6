"""Turn a benchmark JSON into Markdown (and plots), through the one report of the harness.

    python bench/report.py bench/results/suite_standard.json --plots docs \
        > bench/results/suite_standard.md
    python bench/report.py bench/results/logdet.json > bench/results/logdet.md

A suite JSON (written by ``rnf-fast bench``) or a pytest-benchmark JSON (``pytest bench/
--benchmark-json=...``) gives one table per problem, the exact-vs-CG study over d (suite) and
the backends of the single ops (pytest-benchmark); with ``--plots DIR``, the figures
``PREFIX_*.png`` in DIR (PREFIX: ``bench_SIZE`` for a suite, else the JSON's name).
"""

import argparse
import json
import sys
from pathlib import Path

from harness import markdown, plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a suite or pytest-benchmark JSON")
    parser.add_argument("--plots", help="folder for the plots")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    sys.stdout.write(markdown(results))
    if args.plots:
        prefix = f"bench_{results['size']}" if "size" in results else Path(args.results).stem
        for path in plots(results, args.plots, prefix=prefix):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
