"""Time and peak memory of one training step of the log det(JᵀJ) term, per contender.

    pytest bench/ --benchmark-enable --benchmark-json=bench/results/logdet.json
    python bench/report.py bench/results/logdet.json > bench/results/logdet.md

Every case checks its answer against the float64 truth before it is timed.
"""

import pytest

from rnf_fast.benchmarks import CONTENDERS, make_problem, make_step, peak_memory, verify

ROUNDS = {"reverse-mode (vmap(jacrev))": 3}


@pytest.fixture(scope="module")
def problem(bench_size):
    return make_problem("quick" if bench_size == "quick" else "mlp-16-784")


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_logdet_step(benchmark, problem, contender):
    errors = verify(problem, contender)
    benchmark.group = f"log det term, {problem.name}"
    benchmark.extra_info.update(errors)
    benchmark.extra_info["problem"] = problem.name
    benchmark.extra_info["peak_bytes"] = peak_memory(problem.name, contender)
    benchmark.pedantic(
        make_step(problem, contender), rounds=ROUNDS.get(contender, 15), warmup_rounds=1
    )
