"""Turn a benchmark JSON into Markdown (and, for the suite, plots).

    python bench/report.py bench/results/suite_standard.json --plots docs \
        > bench/results/suite_standard.md
    python bench/report.py bench/results/logdet.json > bench/results/logdet.md

A suite JSON (written by ``rnf-fast bench``) gives one table per problem, the exact-vs-CG
study over d and, with ``--plots DIR``, the figures ``bench_SIZE_*.png`` in DIR. A
pytest-benchmark JSON (``pytest bench/ --benchmark-json=...``) gives its tables as before.
"""

import argparse
import json
import sys

from rnf_fast.benchmarks import report_markdown, suite_markdown, suite_plots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a suite or pytest-benchmark JSON")
    parser.add_argument("--plots", help="folder for the suite's plots (suite JSON only)")
    args = parser.parse_args()
    with open(args.results) as f:
        results = json.load(f)
    if results.get("suite") == "rnf_fast":
        sys.stdout.write(suite_markdown(results))
        if args.plots:
            for path in suite_plots(results, args.plots, prefix=f"bench_{results['size']}"):
                print(f"wrote {path}", file=sys.stderr)
    else:
        if args.plots:
            parser.error("--plots needs a suite JSON (written by rnf-fast bench)")
        sys.stdout.write(report_markdown(results))


if __name__ == "__main__":
    main()
