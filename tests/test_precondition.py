"""Preconditioned and warm-started CG in logdet_grad: solutions, unbiased gradients, SLQ value."""

import importlib

import pytest
import torch

import rnf_fast
from rnf_fast.engine.precondition import BATCH_PRECONDITIONER_ROWS
from rnf_fast.testing import (
    SinSoftplusDecoder,
    dense_jacobian,
    dense_logdet,
    grads,
    mlp_decoder,
    rel_error,
)


def _params_and_z(decoder, B, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    return [*decoder.parameters(), z], z


def _random_spd(B, d, seed):
    """Per-sample SPD matrices far from A (condition ~ 30), to exercise the L / Lᵀ algebra."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, d, d, generator=g, dtype=torch.float64)
    return X @ X.transpose(1, 2) + 0.5 * torch.eye(d, dtype=torch.float64)


def _preconditioners(B, d):
    g = torch.Generator().manual_seed(5)
    return {
        "jacobi": "jacobi",
        "batch": "batch",
        "dense per sample": _random_spd(B, d, 4),
        "dense shared": _random_spd(1, d, 6)[0],
        "diagonal per sample": 0.2 + torch.rand(B, d, generator=g, dtype=torch.float64),
    }


@pytest.mark.filterwarnings("ignore:CG reached max_iter")
@pytest.mark.parametrize("name", list(_preconditioners(3, 4)))
def test_full_orthogonal_probes_give_the_exact_value_and_gradient(name):
    # ε = √d e_k for k = 1..d: (1/K) Σ εεᵀ = I exactly, so with exact solves the preconditioned
    # surrogate's gradient is the exact gradient, and the full-Krylov quadrature plus log det M
    # is the exact value: any slip in L versus Lᵀ, or in log det M, shows here.
    decoder = SinSoftplusDecoder(4, 5)
    inputs, z = _params_and_z(decoder, 3, 4)
    V = 2.0 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    value, info = rnf_fast.logdet_grad(
        decoder,
        z,
        method="cg",
        probes=V,
        tol=0.0,
        max_iter=4,
        preconditioner=_preconditioners(3, 4)[name],
        return_info=True,
    )
    truth = dense_logdet(decoder, z)
    assert info.cg.preconditioner == ("given" if "per" in name or "shared" in name else name)
    assert rel_error(value.detach(), truth.detach()) < 1e-9
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-9 or t.norm() == 0


@pytest.mark.parametrize("name", ["jacobi", "dense per sample"])
def test_preconditioned_solution_is_a_inverse_l_eps(name):
    decoder = mlp_decoder(5, 11, hidden=(9,))
    _, z = _params_and_z(decoder, 4, 5)
    eps = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    M = _preconditioners(4, 5)[name]
    _, info = rnf_fast.logdet_grad(
        decoder,
        z,
        method="cg",
        probes=eps,
        tol=1e-11,
        max_iter=20,
        preconditioner=M,
        return_info=True,
    )
    J = dense_jacobian(decoder, z.detach())
    A = J.transpose(1, 2) @ J
    M = torch.diag_embed(torch.diagonal(A, dim1=1, dim2=2)) if name == "jacobi" else M
    V = eps @ torch.linalg.cholesky(M).transpose(1, 2)  # v = L ε
    U = torch.linalg.solve(A, V.transpose(1, 2)).transpose(1, 2)
    assert bool(info.cg.converged.all())
    assert rel_error(info.cg.solution, U.detach()) < 1e-8


@pytest.mark.parametrize("name", ["batch", "dense per sample"])
def test_preconditioned_gradient_is_unbiased(name):
    decoder = mlp_decoder(5, 9, hidden=(8,))
    inputs, z = _params_and_z(decoder, 2, 5)
    exact = torch.cat([g.flatten() for g in grads(dense_logdet(decoder, z), inputs)])
    M = _preconditioners(2, 5)[name]
    gen = torch.Generator().manual_seed(12)
    n = 300
    samples = []
    for _ in range(n):
        v = rnf_fast.logdet_grad(
            decoder, z, method="cg", generator=gen, tol=1e-10, max_iter=15, preconditioner=M
        )
        samples.append(torch.cat([g.flatten() for g in grads(v, inputs)]))
    S = torch.stack(samples)
    mean, se = S.mean(0), S.std(0) / n**0.5
    used = exact.abs() > 1e-12
    zscores = ((mean - exact) / se)[used]
    assert zscores.abs().max() < 4.5, f"max |z| = {zscores.abs().max():.2f}"
    assert (zscores**2).mean() < 1.5
    # Power: a mean gradient half the right one (the factor 2 dropped) would be detected.
    assert (((0.5 * mean - exact) / se)[used] ** 2).mean() > 6
    # Power: w = ε instead of L⁻ᵀ ε (the preconditioner forgotten in the differentiable JVP)
    # would be detected. With u = A⁻¹ L ε that estimator's mean is the gradient of
    # 2 tr(Lᵀ stopgrad(A⁻¹ Jᵀ) J), not of log det A.
    J = dense_jacobian(decoder, z)
    Jd = J.detach()
    A = Jd.transpose(1, 2) @ Jd
    M = A[:BATCH_PRECONDITIONER_ROWS].mean(0, keepdim=True) if name == "batch" else M
    L = torch.linalg.cholesky(M).expand(2, 5, 5)
    inv_A_JT = torch.linalg.solve(A, Jd.transpose(1, 2))  # (B, d, D)
    forgotten = 2.0 * ((L.transpose(1, 2) @ inv_A_JT) * J.transpose(1, 2)).sum((1, 2))
    wrong = torch.cat([g.flatten() for g in grads(forgotten, inputs)])
    assert rel_error(wrong, exact) > 0.1
    assert (((mean - wrong) / se)[used] ** 2).mean() > 6


@pytest.mark.parametrize("name", ["jacobi", "dense per sample"])
def test_preconditioned_slq_value_mean_matches_logdet(name):
    decoder = mlp_decoder(6, 10)
    _, z = _params_and_z(decoder, 2, 6)
    truth = dense_logdet(decoder, z).detach()
    n = 2000
    M = _preconditioners(2, 6)[name]
    M = M if isinstance(M, str) else M.repeat(n, 1, 1)
    est = rnf_fast.logdet(
        decoder.requires_grad_(False),
        z.detach().repeat(n, 1),
        method="cg",
        tol=1e-10,
        max_iter=15,
        generator=torch.Generator().manual_seed(3),
        preconditioner=M,
    ).view(n, 2)
    se = est.std(0) / n**0.5
    assert bool(((est.mean(0) - truth).abs() < 4 * se).all())
    # Power: an estimate without its log det M term would be far outside the error bars.
    if name == "jacobi":
        J = dense_jacobian(decoder, z.detach())
        logdet_M = torch.diagonal(J.transpose(1, 2) @ J, dim1=1, dim2=2).log().sum(1)
    else:
        logdet_M = torch.logdet(M[:2])
    assert bool((logdet_M.abs() > 10 * se).all())


def test_warm_start_keeps_the_solution_and_reports_no_value():
    decoder = mlp_decoder(5, 11, hidden=(9,))
    inputs, z = _params_and_z(decoder, 4, 5)
    eps = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    kw = dict(method="cg", probes=eps, tol=1e-11, return_info=True)
    cold, cold_info = rnf_fast.logdet_grad(decoder, z, **kw)
    x0 = cold_info.cg.solution + 1e-3 * torch.randn_like(cold_info.cg.solution)
    warm, warm_info = rnf_fast.logdet_grad(decoder, z, x0=x0, **kw)
    assert cold_info.value_available and bool(torch.isfinite(cold).all())
    assert not warm_info.value_available and "warm start" in warm_info.value_unavailable_reason
    assert bool(torch.isnan(warm.detach()).all())
    assert bool(warm_info.cg.converged.all())
    assert rel_error(warm_info.cg.solution, cold_info.cg.solution) < 1e-9
    for g, t in zip(grads(warm, inputs), grads(cold, inputs)):
        assert rel_error(g, t) < 1e-9 or t.norm() == 0
    # The exact solution as x0: no iteration, one matvec (the initial residual).
    _, exact_info = rnf_fast.logdet_grad(decoder, z, x0=cold_info.cg.solution, **kw)
    assert exact_info.cg.matvecs == 1 and int(exact_info.cg.iterations.sum()) == 0


def test_warm_start_with_preconditioner_meets_the_tolerance():
    # With a warm start the stopping rule stays relative to ‖ε‖ (not the initial residual):
    # the final residuals are <= tol and the solution agrees with the cold one to ~tol.
    decoder = mlp_decoder(6, 12, hidden=(10,))
    _, z = _params_and_z(decoder, 5, 6)
    eps = torch.randn(5, 2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = dict(method="cg", probes=eps, preconditioner="jacobi", return_info=True)
    _, cold = rnf_fast.logdet_grad(decoder, z, tol=1e-12, max_iter=20, **kw)
    x0 = cold.cg.solution * 1.05
    _, warm = rnf_fast.logdet_grad(decoder, z, tol=1e-2, x0=x0, **kw)
    assert bool((warm.cg.residuals <= 1e-2).all())
    assert rel_error(warm.cg.solution, cold.cg.solution) < 0.05
    _, cold_loose = rnf_fast.logdet_grad(decoder, z, tol=1e-2, **kw)
    assert int(warm.cg.iterations.sum()) < int(cold_loose.cg.iterations.sum())


_SYNCS = ("__bool__", "item", "tolist", "__int__", "__float__", "numpy")


@pytest.mark.filterwarnings("ignore:CG reached max_iter")
def test_fixed_iterations_do_not_synchronise_inside_cg(monkeypatch):
    # On CPU there is no sync debug mode: make every host read of a tensor raise while the
    # CG solve runs (matvecs through the linearization, preconditioner, updates, warm start).
    stochastic = importlib.import_module("rnf_fast.engine.stochastic")
    real_cg = stochastic.batched_cg
    calls = []

    def guarded(*args, **kwargs):
        def refuse(self, *a, **k):
            raise AssertionError("host synchronisation inside the CG loop")

        with monkeypatch.context() as m:
            for name in _SYNCS:
                m.setattr(torch.Tensor, name, refuse)
            result = real_cg(*args, **kwargs)
        calls.append(result.matvecs)
        return result

    monkeypatch.setattr(stochastic, "batched_cg", guarded)
    decoder = mlp_decoder(5, 9)
    inputs, z = _params_and_z(decoder, 3, 5)
    V = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x0 = torch.zeros(3, 2, 5, dtype=torch.float64)
    runs = [(b, "auto") for b in rnf_fast.available_backends("cpu")] + [("torch", "vmap")]
    for backend, batching in runs:
        value = rnf_fast.logdet_grad(
            decoder,
            z,
            method="cg",
            probes=V,
            max_iter=4,
            fixed_iterations=True,
            preconditioner="jacobi",
            x0=x0,
            backend=backend,
            batching=batching,
        )
        grads(value, inputs)
    assert calls and all(c == 5 for c in calls)
    # The guard has teeth: the adaptive loop checks convergence on the host and is refused.
    with pytest.raises(AssertionError, match="host synchronisation"):
        rnf_fast.logdet_grad(decoder, z, method="cg", probes=V, max_iter=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"preconditioner": "ilu"}, ValueError, "preconditioner must be None"),
        ({"preconditioner": 3}, TypeError, "preconditioner must be None"),
        ({"preconditioner": torch.ones(2, 3)}, ValueError, r"preconditioner tensor must be"),
        ({"preconditioner": -torch.ones(3)}, ValueError, "preconditioner diagonal"),
        ({"preconditioner": torch.ones(3, 3)}, ValueError, "preconditioner matrix must be pos"),
        ({"preconditioner": torch.ones(3, 3).triu()}, ValueError, "must be symmetric"),
        ({"x0": torch.zeros(4, 2, 3)}, ValueError, r"x0 must be \(B, K, d\) = \(4, 1, 3\)"),
        ({"x0": [0.0]}, TypeError, "x0 must be None or"),
        ({"x0": torch.full((4, 1, 3), float("nan"))}, ValueError, "x0 contains NaN"),
        ({"method": "exact", "preconditioner": "jacobi"}, ValueError, "preconditioner applies"),
        ({"method": "exact", "x0": torch.zeros(4, 1, 3)}, ValueError, "x0 applies"),
    ],
)
def test_bad_options_name_the_argument(kwargs, error, match):
    decoder = mlp_decoder(3, 7)
    _, z = _params_and_z(decoder, 4, 3)
    kwargs = {"method": "cg", **kwargs}
    with pytest.raises(error, match=match):
        rnf_fast.logdet_grad(decoder, z.detach(), **kwargs)
