"""The benchmark suite's cells, each verified against the float64 truth and run once.

    pytest bench/test_suite_bench.py                        # quick sizes (the default run)
    pytest bench/test_suite_bench.py --bench-size=standard  # the real sizes, verified

The timed suite, with its JSON, Markdown tables and plots, is ``rnf-fast bench`` (see
bench/README.md); this file checks that every cell it times computes the right thing.
"""

import json
import math

import pytest
from harness import (
    STUDY_CONTENDERS,
    STUDY_D,
    SUITES,
    make_problem,
    markdown,
    peak_memory,
    plots,
    run_case,
    suite_contenders,
)
from harness.contenders import JACFWD

CONTENDERS = list(suite_contenders("cpu"))
_cache: dict = {}


def pytest_generate_tests(metafunc):
    if "problem" in metafunc.fixturenames:
        metafunc.parametrize("problem", SUITES[metafunc.config.getoption("--bench-size")])


@pytest.mark.parametrize("contender", CONTENDERS)
def test_suite_cell(problem, contender, bench_size):
    # Standard sizes: a share of 60 s per cell, so that cells like reverse-mode at image size
    # are skipped on their extrapolated time instead of exhausting the machine.
    share = None if bench_size == "quick" else 60
    row = run_case(problem, contender, share_s=share, memory=False, cache=_cache)
    if row["status"] == "skipped":
        assert bench_size == "standard" and row["estimate_s"] * 5 > share
        return
    assert row["status"] == "ok"
    # Finite errors (neither NaN nor inf): the value's only where the contender computes one.
    assert math.isfinite(row["grad_rel_err"]), row
    assert row["value_rel_err"] is None or math.isfinite(row["value_rel_err"]), row
    if contender.startswith("rnf_fast cg"):
        assert row["matvecs"] >= 1 and row["cg_iterations"] >= 1


def test_study_and_report(tmp_path, bench_size):
    """The d-study's smallest two cells, the Markdown and the plots from the JSON."""
    base, ds = STUDY_D["quick"]
    rows = [
        run_case(base, c, share_s=None, d=d, memory=False, cache=_cache)
        for d in ds
        for c in STUDY_CONTENDERS[:2]
    ]
    results = {
        "size": "quick",
        "device": "cpu",
        "rows": rows[:2],
        "study_d": {"problem": base, "ds": list(ds), "rows": rows, "crossover": {"x from d": 2}},
    }
    results = json.loads(json.dumps(results))  # what report.py reads back
    text = markdown(results)
    assert "Exact vs CG as d grows" in text and "rnf_fast cg K=1" in text
    written = plots(results, tmp_path)
    assert {p.name for p in written} == {"bench_time.png", "bench_d_time.png"}
    assert all(p.stat().st_size > 0 for p in written)


def test_peak_memory_one_process_per_problem():
    """One memory process measures and reports each contender of a problem in turn, each
    with its own peak: both steps build the float32 Jacobian J (B, D, d), so each peak is at
    least its size; a probe whose high-water mark is not reset between contenders, or that
    loses the step's allocations, fails one of the two bounds."""
    names = ["rnf_fast exact", JACFWD]
    peaks = peak_memory("mlp-16-784", names)
    assert set(peaks) == set(names)
    spec = make_problem("mlp-16-784", truth=False).spec
    jacobian = spec.B * spec.D * spec.d * 4
    assert all(p >= jacobian for p in peaks.values()), (peaks, jacobian)
