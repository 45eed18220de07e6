"""``rnf-fast info`` and ``rnf-fast bench`` without the benchmark harness beside the package."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rnf_fast import cli


def test_info_imports_no_harness():
    """``info`` describes the machine from rnf_fast.machine; the harness (bench/harness, the
    module ``harness``) stays unimported, as it is in an installed package without bench/."""
    code = (
        "import sys; from rnf_fast.cli import main; main(['info']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'harness'))"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("rnf_fast ") and any("backends" in line for line in lines)
    assert lines[-1] == "[]", lines[-1]


def test_bench_without_the_repository_says_where_the_suite_lives(tmp_path, monkeypatch):
    """An installed package has no bench/ beside it: one line that names bench/ and the
    repository, not an ImportError."""
    monkeypatch.setattr(cli, "_bench_dir", lambda: tmp_path / "bench")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--size", "quick", "--out", str(tmp_path / "out")])
    message = str(exc.value.code)
    assert "\n" not in message
    assert "bench/" in message and "repository" in message and "pip install -e ." in message
    assert not (tmp_path / "out").exists()


def test_bench_finds_the_harness_of_the_checkout():
    """From a checkout (an editable install), bench/harness sits beside the package."""
    assert (cli._bench_dir() / "harness" / "__init__.py").is_file()
