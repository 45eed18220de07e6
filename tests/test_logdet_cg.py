"""The stochastic path: determinism, solves, unbiasedness against the exact gradient, SLQ value."""

import pytest
import torch

import rnf_fast
from rnf_fast.testing import (
    NonVmappableDecoder,
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


def test_fixed_probes_are_deterministic():
    decoder = mlp_decoder(4, 9)
    inputs, z = _params_and_z(decoder, 3, 4)
    V = torch.randn(3, 2, 4, dtype=torch.float64)
    a = rnf_fast.logdet_grad(decoder, z, method="cg", probes=V)
    b = rnf_fast.logdet_grad(decoder, z, method="cg", probes=V)
    assert torch.equal(a, b)
    for x, y in zip(grads(a, inputs), grads(b, inputs)):
        assert torch.equal(x, y)


def test_generator_makes_probes_reproducible():
    decoder = mlp_decoder(4, 9)
    _, z = _params_and_z(decoder, 3, 4)
    a = rnf_fast.logdet(decoder, z, method="cg", generator=torch.Generator().manual_seed(7))
    b = rnf_fast.logdet(decoder, z, method="cg", generator=torch.Generator().manual_seed(7))
    c = rnf_fast.logdet(decoder, z, method="cg", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cg_solution_matches_linalg_solve():
    # The detached half of the surrogate is J A⁻¹ v: check it against a dense solve through the
    # gradient with respect to a linear decoder's weight, where everything is closed form.
    decoder = mlp_decoder(3, 8, hidden=(10,))
    inputs, z = _params_and_z(decoder, 4, 3)
    V = torch.randn(4, 1, 3, dtype=torch.float64)
    value, info = rnf_fast.logdet_grad(
        decoder, z, method="cg", probes=V, tol=1e-12, max_iter=30, return_info=True
    )
    J = dense_jacobian(decoder, z.detach())
    U = torch.linalg.solve(J.transpose(1, 2) @ J, V.transpose(1, 2))  # (B, d, 1)
    W = (J @ U).transpose(1, 2).detach()  # J A⁻¹ v
    Jv = torch.func.jvp(decoder, (z,), (V[:, 0],))[1]
    surrogate = 2.0 * (W[:, 0] * Jv).sum(1)
    assert bool(info.cg.converged.all())
    for g, t in zip(grads(value, inputs), grads(surrogate, inputs)):
        assert rel_error(g, t) < 1e-9 or t.norm() == 0


def test_orthogonal_full_probes_give_the_exact_value_and_gradient():
    decoder = SinSoftplusDecoder(4, 5)
    inputs, z = _params_and_z(decoder, 3, 4)
    V = 2.0 * torch.eye(4, dtype=torch.float64).expand(3, 4, 4)  # √d e_k: Σ v vᵀ / K = I
    value = rnf_fast.logdet_grad(decoder, z, method="cg", probes=V, tol=0.0, max_iter=4)
    truth = dense_logdet(decoder, z)
    assert rel_error(value.detach(), truth.detach()) < 1e-9
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-9 or t.norm() == 0


@pytest.mark.parametrize("probe_kind", ["gaussian", "rademacher"])
def test_gradient_estimate_is_unbiased(probe_kind):
    decoder = mlp_decoder(5, 9, hidden=(8,))
    inputs, z = _params_and_z(decoder, 2, 5)
    exact = torch.cat([g.flatten() for g in grads(dense_logdet(decoder, z), inputs)])
    gen = torch.Generator().manual_seed(11)
    n = 300
    samples = []
    for _ in range(n):
        v = rnf_fast.logdet_grad(
            decoder, z, method="cg", probes=1, probe_kind=probe_kind, generator=gen, tol=1e-10
        )
        samples.append(torch.cat([g.flatten() for g in grads(v, inputs)]))
    S = torch.stack(samples)
    mean, se = S.mean(0), S.std(0) / n**0.5
    used = exact.abs() > 1e-12
    zscores = ((mean - exact) / se)[used]
    assert zscores.abs().max() < 4.5, f"max |z| = {zscores.abs().max():.2f}"
    assert (zscores**2).mean() < 1.5  # ~1 for an unbiased estimate
    # Power: dropping the factor 2 (the gradient of ½ log det) would be detected.
    assert (((0.5 * mean - exact) / se)[used] ** 2).mean() > 6


def test_slq_value_mean_matches_logdet():
    decoder = mlp_decoder(6, 10)
    _, z = _params_and_z(decoder, 2, 6)
    truth = dense_logdet(decoder, z).detach()
    n = 2000
    est = rnf_fast.logdet(
        decoder,
        z.detach().repeat(n, 1),
        method="cg",
        tol=1e-10,
        generator=torch.Generator().manual_seed(3),
    ).view(n, 2)
    se = est.std(0) / n**0.5
    assert bool(((est.mean(0) - truth).abs() < 4 * se).all())


def test_info_reports_iterations_residuals_and_convergence():
    decoder = mlp_decoder(6, 10)
    _, z = _params_and_z(decoder, 3, 6)
    _, info = rnf_fast.logdet_grad(decoder, z, method="cg", probes=2, tol=1e-6, return_info=True)
    assert info.method == "cg" and info.probes == 2 and info.exact is None
    assert info.backend == rnf_fast.available_backends("cpu")[0]
    cg = info.cg
    assert cg.iterations.shape == (3, 2) and cg.residuals.shape == (3, 2)
    assert bool(cg.converged.all()) and bool((cg.residuals <= 1e-6).all())
    assert cg.matvecs == int(cg.iterations.max())


def test_unconverged_cg_warns():
    decoder = mlp_decoder(8, 12)
    _, z = _params_and_z(decoder, 2, 8)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        rnf_fast.logdet_grad(decoder, z, method="cg", tol=1e-12, max_iter=2)


def test_non_vmappable_decoder_through_cg():
    decoder = NonVmappableDecoder(3, 8)
    inputs, z = _params_and_z(decoder, 4, 3)
    V = 3**0.5 * torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
    value, info = rnf_fast.logdet_grad(
        decoder, z, method="cg", probes=V, tol=0.0, max_iter=3, return_info=True
    )
    truth = dense_logdet(decoder, z)
    assert info.batching == "repeat"
    assert rel_error(value.detach(), truth.detach()) < 1e-9
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-9 or t.norm() == 0
