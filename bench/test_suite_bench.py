"""The benchmark suite's cells, each verified against the float64 truth and run once.

    pytest bench/test_suite_bench.py                        # quick sizes (the default run)
    pytest bench/test_suite_bench.py --bench-size=standard  # the real sizes, verified

The timed suite, with its JSON, Markdown tables and plots, is ``rnf-fast bench`` (see
bench/README.md); this file checks that every cell it times computes the right thing.
"""

import json

import pytest

from rnf_fast.benchmarks import (
    STUDY_CONTENDERS,
    STUDY_D,
    SUITES,
    run_case,
    suite_contenders,
    suite_markdown,
    suite_peak_memory,
    suite_plots,
)

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
    assert row["grad_rel_err"] == row["grad_rel_err"]  # finite, not NaN
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
    text = suite_markdown(results)
    assert "Exact vs CG as d grows" in text and "rnf_fast cg K=1" in text
    written = suite_plots(results, tmp_path)
    assert {p.name for p in written} == {"bench_time.png", "bench_d_time.png"}
    assert all(p.stat().st_size > 0 for p in written)


def test_suite_peak_memory_one_process_per_problem():
    """One memory process measures and reports each contender of a problem in turn."""
    names = ["rnf_fast exact", "free-form surrogate (FIF, K=1)"]
    peaks = suite_peak_memory("quick-flow", names)
    assert set(peaks) == set(names)
    assert all(p >= 0 for p in peaks.values())  # tiny steps may add no resident pages
