"""Copy the committed result tables (bench/results/*.md) into the README's marked blocks.

A block in README.md looks like

    <!-- results: logdet.md -->
    ...replaced...
    <!-- /results -->

    python bench/readme_tables.py
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- results: (\S+) -->\n)(.*?)(<!-- /results -->)", re.S)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()

    def fill(m: re.Match) -> str:
        table = (ROOT / "bench" / "results" / m.group(2)).read_text()
        return m.group(1) + table.rstrip("\n") + "\n" + m.group(4)

    readme.write_text(BLOCK.sub(fill, text))


if __name__ == "__main__":
    main()
