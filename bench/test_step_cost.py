"""bench/step_cost.py runs, verifies and writes its record (one quick case, one round)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_cost_writes_a_record(tmp_path):
    out = tmp_path / "step_cost.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "bench/step_cost.py"), "--cases", "vonmises"]
    subprocess.run([*cmd, "--rounds", "1", "--out", str(out)], env=env, check=True, timeout=600)
    row = json.loads(out.read_text())["cases"]["vonmises"]
    assert row["d"] == 1 and row["cosine_cg_exact"] > 0.9
    assert set(row["variants"]) == {"plain", "exact", "cg", "cg-roulette"}
    assert row["variants"]["plain"]["x_plain"] == 1.0
    # d = 1: one Rademacher probe makes CG exact after one matvec; the truncation runs 1 too.
    assert row["variants"]["cg"]["matvecs"] == row["variants"]["cg-roulette"]["matvecs"] == 1


def test_step_cost_rejects_unknown_cases():
    cmd = [sys.executable, str(ROOT / "bench/step_cost.py"), "--cases", "nope"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cases" in proc.stderr
