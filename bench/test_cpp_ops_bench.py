"""The compiled ops of rnf_fast._C (backend "cpp") against their PyTorch reference, on CPU.

    pytest bench/test_cpp_ops_bench.py --bench-size=standard --benchmark-enable \
        --benchmark-json=bench/results/cpp_ops.json
    python bench/report.py bench/results/cpp_ops.json > bench/results/cpp_ops.md

Sizes: ``quick`` runs each case once on a few tiny systems; ``standard`` times 4096 systems of
d = 16 and 1024 of d = 64, in float64 (the engine's default linalg dtype) and float32, plus one
training step of ``logdet_grad`` (exact and CG) on the standard MLP problem with each backend.
Every case checks its answer against the reference before it is timed. The cpp case of each
op and size records ``speedup_vs_torch`` (the torch median over its own, same run) in
``extra_info``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from harness import make_problem

import rnf_fast
from rnf_fast.ops import cpp as cpp_backend
from rnf_fast.ops import reference
from rnf_fast.ops.dispatch import get_backend
from rnf_fast.testing import rel_error

pytestmark = pytest.mark.skipif(
    cpp_backend._C is None, reason=cpp_backend.unavailable_reason() or ""
)

BACKENDS = ("torch", "cpp")
OPS = ["cg_update", "lanczos_logquad", "cholesky_logdet", "cholesky_inverse"]
SIZES = {"quick": [(7, 3), (5, 9)], "standard": [(4096, 16), (1024, 64)]}
DTYPES = {"quick": [torch.float64], "standard": [torch.float64, torch.float32]}
ROUNDS = {"quick": 1, "standard": 10}


@dataclass(frozen=True)
class Case:
    op: str
    N: int
    d: int
    dtype: torch.dtype
    backend: str

    @property
    def problem(self) -> str:
        return f"{self.op} N={self.N} d={self.d} {str(self.dtype).removeprefix('torch.')}"


def pytest_generate_tests(metafunc):
    size = metafunc.config.getoption("--bench-size")
    if "case" in metafunc.fixturenames:
        cases = [
            Case(op, N, d, dtype, backend)
            for op in OPS
            for N, d in SIZES[size]
            for dtype in DTYPES[size]
            for backend in BACKENDS  # torch first: the cpp case reports its speed-up over it
        ]
        metafunc.parametrize("case", cases, ids=[f"{c.problem}-{c.backend}" for c in cases])
    if "method" in metafunc.fixturenames:
        pairs = [(method, backend) for method in ("exact", "cg") for backend in BACKENDS]
        metafunc.parametrize("method, backend", pairs, ids=[f"{m}-{b}" for m, b in pairs])


def _inputs(N, d, dtype):
    """A = JᵀJ (J of shape (N, 2d, d)), right-hand sides b, and the CG coefficients of A x = b
    at tolerance 1e-6 (steps differ per system), all in dtype."""
    g = torch.Generator().manual_seed(N * 1000 + d)
    J = torch.randn(N, 2 * d, d, generator=g, dtype=torch.float64)
    A = reference.gram(J).to(dtype)
    b = torch.randn(N, d, generator=g, dtype=dtype)
    state = reference.cg_init(b, d)
    for _ in range(d):
        reference.cg_update(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), 1e-6)
    return A, b, state


def _runner(case: Case, A, b, state):
    """(setup, run) for pytest-benchmark's pedantic mode: setup builds fresh arguments (the CG
    step updates its state in place), run is the timed call."""
    ops = get_backend(case.backend, torch.device("cpu"))[1]  # with the reference's cg_init
    if case.op == "cg_update":
        Ap = (A @ b.unsqueeze(-1)).squeeze(-1)
        return (lambda: ((ops.cg_init(b, case.d), Ap, 1e-6), {})), ops.cg_update
    if case.op == "lanczos_logquad":
        args = (state.alphas, state.betas, state.steps, state.bb)
        return (lambda: (args, {})), ops.lanczos_logquad
    if case.op == "cholesky_logdet":
        return (lambda: ((A,), {})), ops.cholesky_logdet
    L = ops.cholesky_logdet(A)[0]  # each backend's own factor (and memory layout)
    return (lambda: ((L,), {})), ops.cholesky_inverse


def _verify(case: Case, setup, run, reference_run):
    args, _ = setup()
    got = run(*args)
    args, _ = setup()
    want = reference_run(*args)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    tol = 1e-10 if case.dtype == torch.float64 else 1e-3
    for a, w in zip(got, want):
        if a.is_floating_point():
            ok = ~torch.isnan(w)
            assert torch.equal(torch.isnan(a), ~ok), f"{case.problem}: NaN patterns differ"
            assert rel_error(a[ok].double(), w[ok].double()) < tol, f"{case.problem}: mismatch"
        else:
            assert torch.equal(a, w), f"{case.problem}: integer outputs differ"


_torch_medians: dict[str, float] = {}


def _record_speedup(benchmark, key: str, backend: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    median = stats.stats.median
    if backend == "torch":
        _torch_medians[key] = median
    elif key in _torch_medians:
        benchmark.extra_info["speedup_vs_torch"] = _torch_medians[key] / median


def test_op(benchmark, bench_size, case):
    A, b, state = _inputs(case.N, case.d, case.dtype)
    setup, run = _runner(case, A, b, state)
    _, reference_run = _runner(Case(case.op, case.N, case.d, case.dtype, "torch"), A, b, state)
    _verify(case, setup, run, reference_run)
    benchmark.group = case.problem
    benchmark.extra_info.update(problem=case.problem, contender=case.backend)
    rounds = ROUNDS[bench_size]
    benchmark.pedantic(run, setup=setup, rounds=rounds, warmup_rounds=min(1, rounds - 1))
    _record_speedup(benchmark, case.problem, case.backend)


@pytest.fixture(scope="module")
def problem(bench_size):
    return make_problem("quick" if bench_size == "quick" else "mlp-16-784", truth=False)


def test_logdet_grad_step(benchmark, bench_size, problem, method, backend):
    """One training step of the log det term (forward, logdet_grad, backward) per backend: the
    small ops are only part of it, next to the decoder's tangent passes."""
    B, d = problem.z.shape
    probes = torch.randn(B, 4, d, generator=torch.Generator().manual_seed(0))
    params = [*problem.decoder.parameters(), problem.z]

    def make_step(backend_name):
        def step():
            for p in params:
                p.grad = None
            options = {"exact": rnf_fast.Exact(), "cg": rnf_fast.CG(probes=probes)}[method]
            value = rnf_fast.logdet_grad(problem.decoder, problem.z, options, backend=backend_name)
            value.sum().backward()
            grad = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            return value.detach(), torch.cat([g.flatten() for g in grad])

        return step

    step = make_step(backend)
    value, grad = step()
    value_ref, grad_ref = make_step("torch")()
    assert rel_error(value, value_ref) < 1e-5 and rel_error(grad, grad_ref) < 1e-5
    key = f"logdet_grad {method} {problem.name}"
    benchmark.group = key
    benchmark.extra_info.update(problem=key, contender=backend)
    rounds = ROUNDS[bench_size]
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=min(1, rounds - 1))
    _record_speedup(benchmark, key, backend)
