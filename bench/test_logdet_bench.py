"""Time and peak memory of one training step of the log det(JᵀJ) term, per contender.

    pytest bench/test_logdet_bench.py --bench-size=standard --benchmark-enable \
        --benchmark-save-data
        --benchmark-json=bench/results/logdet.json
    python bench/report.py bench/results/logdet.json > bench/results/logdet.md

Every case checks its answer against the float64 truth before it is timed. The full suite
(all problems and alternatives, with plots) is ``rnf-fast bench``: see bench/README.md.
"""

import pytest
from harness import contenders, make_problem, peak_memory, step_closure, verify
from harness.contenders import JACFWD, JACREV

ROUNDS = {JACREV: 3}
CHUNKED = ["rnf_fast exact", "rnf_fast exact chunk=16", "rnf_fast exact chunk=4"]
TABLE = [
    "rnf_fast exact",
    "rnf_fast exact chunk=4",
    "rnf_fast cg K=1",
    "rnf_fast cg K=4",
    "rnf_fast auto",
    "rnf_fast exact, generic path",
    "rnf_fast cg K=1, generic path",
    JACFWD,
    JACREV,
]
"""The contenders of the first table (the registry's names)."""
REGISTRY = contenders("cpu")


def _run_case(benchmark, problem, name, rounds):
    contender = REGISTRY[name]
    errors = verify(problem, name, contender)
    benchmark.group = problem.name
    benchmark.extra_info.update(errors, problem=problem.name, contender=name)
    peak = 0
    # A fresh process per case costs seconds; the quick run checks the measurement once
    # (test_peak_memory_counts_the_jacobian) instead.
    if problem.name != "quick":
        peak = peak_memory(problem.name, [name], d=problem.spec.d)[name]
        benchmark.extra_info["peak_bytes"] = peak
    benchmark.pedantic(step_closure(problem, contender), rounds=rounds, warmup_rounds=1)
    return peak


def test_peak_memory_counts_the_jacobian():
    """The fresh-process peak of an exact step on the standard MLP problem holds at least the
    float32 Jacobian J (B, D, d) that the step builds: a probe that lost the step's allocations
    (a high-water mark read before the step, a reset that wipes it) reports less."""
    problem = make_problem("mlp-16-784", truth=False)
    B, D, d = problem.spec.B, problem.spec.D, problem.spec.d
    peak = peak_memory("mlp-16-784", ["rnf_fast exact"])["rnf_fast exact"]
    assert peak >= B * D * d * 4, f"peak {peak} B < the Jacobian's {B * D * d * 4} B"


@pytest.fixture(scope="module")
def problem(bench_size):
    return make_problem("quick" if bench_size == "quick" else "mlp-16-784")


@pytest.fixture(scope="module")
def wide_problem(bench_size):
    return make_problem("quick" if bench_size == "quick" else "mlp-64-784-wide")


@pytest.mark.parametrize("contender", TABLE)
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
