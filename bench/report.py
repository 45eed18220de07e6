"""Turn a benchmark JSON written by ``pytest bench/ --benchmark-json=...`` into Markdown.

python bench/report.py bench/results/logdet.json > bench/results/logdet.md
"""

import json
import sys

from rnf_fast.benchmarks import report_markdown

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/report.py RESULTS.json")
    with open(sys.argv[1]) as f:
        sys.stdout.write(report_markdown(json.load(f)))
