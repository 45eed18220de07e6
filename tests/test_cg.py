"""Batched CG and stochastic Lanczos quadrature on explicit SPD matrices."""

import math

import pytest
import torch

from rnf_fast.engine.cg import batched_cg
from rnf_fast.testing import rel_error


def _spd(N, d, cond, generator):
    Q, _ = torch.linalg.qr(torch.randn(N, d, d, generator=generator, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), d, dtype=torch.float64)
    eig = eig[torch.randperm(d, generator=generator)]
    return Q @ torch.diag_embed(eig.expand(N, d)) @ Q.transpose(1, 2)


def _matvec(A):
    return lambda P: (A @ P.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("d", [1, 5, 13])
def test_cg_solves_match_linalg_solve(d):
    g = torch.Generator().manual_seed(1)
    A = _spd(7, d, 50.0, g)
    b = torch.randn(7, d, generator=g, dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=1e-12, max_iter=3 * d)
    assert bool(res.converged.all())
    assert rel_error(res.x, torch.linalg.solve(A, b)) < 1e-9


def test_stopping_rule_is_per_system():
    g = torch.Generator().manual_seed(2)
    d = 12
    A = torch.cat([torch.eye(d, dtype=torch.float64)[None] * 3.0, _spd(1, d, 1e3, g)])
    b = torch.randn(2, d, generator=g, dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=1e-8, max_iter=60)
    assert res.steps.tolist()[0] == 1  # a multiple of I converges in one step and stops
    assert res.steps[1] > 5
    assert bool((res.residuals <= 1e-8).all())


def test_iteration_cap_and_unconverged_flag():
    g = torch.Generator().manual_seed(3)
    A = _spd(3, 20, 1e4, g)
    b = torch.randn(3, 20, generator=g, dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=1e-12, max_iter=4)
    assert res.matvecs == 4 and not bool(res.converged.any())
    assert res.alphas.shape == (3, 4)


def test_fixed_iterations_run_to_the_cap_and_freeze_converged_systems():
    A = torch.eye(4, dtype=torch.float64).expand(2, 4, 4) * 2.0
    b = torch.ones(2, 4, dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=1e-10, max_iter=6, fixed_iterations=True)
    assert res.matvecs == 6 and res.steps.tolist() == [1, 1]
    assert rel_error(res.x, b / 2) < 1e-15


def test_breakdown_on_indefinite_matrix():
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))[None]
    b = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=1e-10, max_iter=4)
    assert bool(res.breakdown.all()) and not bool(res.converged.any())


@pytest.mark.parametrize("d", [1, 4, 9])
def test_slq_is_exact_after_d_iterations(d):
    g = torch.Generator().manual_seed(4)
    A = _spd(5, d, 30.0, g)
    b = torch.randn(5, d, generator=g, dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=0.0, max_iter=d)
    evals, evecs = torch.linalg.eigh(A)
    logA = evecs @ torch.diag_embed(torch.log(evals)) @ evecs.transpose(1, 2)
    truth = torch.einsum("ni,nij,nj->n", b, logA, b)
    assert rel_error(res.logquad(), truth) < 1e-9


def test_slq_with_early_stop_uses_only_live_coefficients():
    # Systems that stop early must not pick up coefficients of later iterations.
    g = torch.Generator().manual_seed(5)
    A = torch.cat([torch.eye(6, dtype=torch.float64)[None] * 2.0, _spd(1, 6, 20.0, g)])
    b = torch.randn(2, 6, generator=g, dtype=torch.float64)
    res = batched_cg(_matvec(A), b, tol=1e-13, max_iter=6)
    assert abs(res.logquad()[0].item() - (b[0] ** 2).sum().item() * math.log(2.0)) < 1e-12


def test_slq_mean_over_probes_estimates_logdet():
    g = torch.Generator().manual_seed(6)
    d, n = 8, 4000
    A = _spd(1, d, 20.0, g).expand(n, d, d)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    est = batched_cg(_matvec(A), v, tol=1e-10, max_iter=d).logquad()
    truth = torch.logdet(A[0]).item()
    se = est.std().item() / n**0.5
    assert abs(est.mean().item() - truth) < 4 * se
    assert se < 0.1 * abs(truth)  # the test has power: the bound is tight


def test_warm_start_solves_and_stops_relative_to_b():
    g = torch.Generator().manual_seed(4)
    A = _spd(6, 9, 100.0, g)
    b = torch.randn(6, 9, generator=g, dtype=torch.float64)
    truth = torch.linalg.solve(A, b)
    x0 = truth + 0.01 * torch.randn(6, 9, generator=g, dtype=torch.float64)
    steps_seen = []
    res = batched_cg(_matvec(A), b, tol=1e-3, max_iter=30, x0=x0, on_step=steps_seen.append)
    true_residual = (b - (A @ res.x.unsqueeze(-1)).squeeze(-1)).norm(dim=1) / b.norm(dim=1)
    assert res.warm_start and bool(res.converged.all())
    assert bool((true_residual <= 1.01e-3).all())  # relative to ‖b‖, not to ‖b - A x0‖
    cold = batched_cg(_matvec(A), b, tol=1e-3, max_iter=30)
    assert int(res.steps.sum()) < int(cold.steps.sum())
    assert res.matvecs == res.alphas.shape[1] + 1  # the initial residual's product
    assert torch.equal(steps_seen[0], torch.ones(6, dtype=torch.float64))  # 0 -> x0 along x0
    with pytest.raises(ValueError, match="warm-started"):
        res.logquad()


def test_fixed_iterations_make_no_host_reads(monkeypatch):
    g = torch.Generator().manual_seed(5)
    A = _spd(4, 6, 30.0, g)
    b = torch.randn(4, 6, generator=g, dtype=torch.float64)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronisation")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    res = batched_cg(_matvec(A), b, tol=1e-6, max_iter=6, fixed_iterations=True, x0=0 * b)
    with pytest.raises(AssertionError, match="host synchronisation"):
        batched_cg(_matvec(A), b, tol=1e-6, max_iter=6)
    monkeypatch.undo()
    assert res.matvecs == 7 and rel_error(res.x, torch.linalg.solve(A, b)) < 1e-6


def test_cg_state_clone_is_independent():
    from rnf_fast.ops import reference

    A = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 2.0
    state = reference.cg_init(torch.randn(2, 3, dtype=torch.float64), 3)
    copy = state.clone()
    reference.cg_update(copy, (A @ copy.p.unsqueeze(-1)).squeeze(-1), 1e-8)
    assert copy.it == 1 and state.it == 0
    assert bool(copy.x.abs().sum() > 0) and bool((state.x == 0).all())  # state untouched
    assert torch.equal(state.clone().r, state.r) and state.clone().r is not state.r
