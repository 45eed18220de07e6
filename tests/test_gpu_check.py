"""bench/gpu_check.sh in its CPU mode: the GPU check script itself runs in the test command, so
the one short GPU run it is made for does not stop on a mistake the CPU could have caught."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = (os.environ | {"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}) | (env or {})
    return subprocess.run(
        ["bash", str(SCRIPT), "--cpu", "--quick", "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cpu_mode_runs_every_section_and_records_each(tmp_path):
    proc = _run(tmp_path, "--build", "none")
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    sections = json.loads((tmp_path / "check.json").read_text())
    assert [s["section"] for s in sections] == [
        "versions", "build", "info", "cuda_tests",
        "bench_ceilings", "bench_kernels", "bench_logdet", "bench_graph_cg", "report",
    ]  # fmt: skip
    assert all(s["status"] == "ok" for s in sections), sections
    assert all((tmp_path / s["log"]).is_file() for s in sections)
    # The CUDA tests were collected (and skipped here), not silently absent.
    assert "skipped" in (tmp_path / "cuda_tests.log").read_text()
    for name in ("ceilings", "kernels", "logdet", "graph_cg"):
        result = json.loads((tmp_path / f"bench_{name}.json").read_text())
        assert result["rows"], name
        statuses = {row.get("status", "ok") for row in result["rows"]}
        assert statuses <= {"ok", "skipped"}, (name, statuses)
    assert (tmp_path / "summary.md").read_text().strip()


def test_a_failing_section_is_recorded_and_the_next_ones_still_run(tmp_path):
    # With the extension switched off, the minimal build has nothing to build and fails.
    proc = _run(
        tmp_path, "--build", "minimal", "--sections", "build,info",
        env={"RNF_FAST_NO_EXTENSION": "1"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    statuses = {
        s["section"]: s["status"] for s in json.loads((tmp_path / "check.json").read_text())
    }
    assert statuses == {"build": "failed", "info": "ok"}
    assert "RNF_FAST_NO_EXTENSION" in (tmp_path / "build.log").read_text()


def test_bad_options_are_usage_errors(tmp_path):
    for args in (["--sections", "nope"], ["--build", "conda"], ["--frobnicate"]):
        proc = _run(tmp_path, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "gpu_check:" in proc.stderr
