"""Time and peak memory of one training step of the log det(JᵀJ) term, per contender.

    pytest bench/test_logdet_bench.py --bench-size=standard --benchmark-enable \
        --benchmark-save-data
        --benchmark-json=bench/results/logdet.json
    python bench/report.py bench/results/logdet.json > bench/results/logdet.md

Every case checks its answer against the float64 truth before it is timed. The full suite
(all problems and alternatives, with plots) is ``rnf-fast bench``: see bench/README.md.
"""

import pytest

from rnf_fast.benchmarks import CONTENDERS, make_problem, make_step, peak_memory, verify

ROUNDS = {"reverse-mode (vmap(jacrev))": 3}
CHUNKED = ["rnf_fast exact", "rnf_fast exact chunk=16", "rnf_fast exact chunk=4"]


def _run_case(benchmark, problem, contender, rounds):
    errors = verify(problem, contender)
    benchmark.group = problem.name
    benchmark.extra_info.update(errors, problem=problem.name, contender=contender)
    peak = 0
    # A fresh process per case costs seconds; the quick run checks the measurement once
    # (test_peak_memory_quick) instead.
    if problem.name != "quick":
        peak = peak_memory(problem.name, contender, d=problem.spec.d)
        benchmark.extra_info["peak_bytes"] = peak
    benchmark.pedantic(make_step(problem, contender), rounds=rounds, warmup_rounds=1)
    return peak


def test_peak_memory_quick():
    """The fresh-process peak memory measurement runs (tiny steps may add no resident pages)."""
    assert peak_memory("quick", "forward-mode (vmap(jacfwd))", d=3) >= 0


@pytest.fixture(scope="module")
def problem(bench_size):
    return make_problem("quick" if bench_size == "quick" else "mlp-16-784")


@pytest.fixture(scope="module")
def wide_problem(bench_size):
    return make_problem("quick" if bench_size == "quick" else "mlp-64-784-wide")


@pytest.mark.parametrize("contender", [c for c in CONTENDERS if c not in CHUNKED[1:-1]])
def test_logdet_step(benchmark, problem, contender):
    _run_case(benchmark, problem, contender, ROUNDS.get(contender, 15))


_peaks: dict[str, int] = {}


@pytest.mark.parametrize("contender", CHUNKED)
def test_exact_chunking(benchmark, wide_problem, bench_size, contender):
    """Peak memory of the exact path falls with chunk_size on a decoder whose tangent graph
    dominates memory (d = 64, hidden 1024)."""
    _peaks[contender] = _run_case(benchmark, wide_problem, contender, 5)
    if bench_size == "standard" and contender == CHUNKED[-1]:
        peaks = [_peaks[c] for c in CHUNKED]
        assert peaks == sorted(peaks, reverse=True), f"peak memory did not fall: {peaks}"
