"""Synthetic manifold densities: exact entropies, normalisation, sample moments, bad input."""

import math

import numpy as np
import pytest
import torch

from rnf_fast.data import (
    VonMises,
    VonMisesFisher,
    make_vmf_sphere,
    make_von_mises,
    make_von_mises_torus,
)

SE = 4.5  # statistical bounds, in standard errors (fixed seeds, never reruns)


def _mean_within(samples: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Asserts each column mean of samples (n, k) is within SE standard errors of expected (k,)."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    z = ((mean - expected).abs() / se.clamp_min(1e-12)).max().item()
    assert z < SE, f"{what}: mean {mean.tolist()} vs {expected.tolist()} is {z:.1f} SE off"


def test_von_mises_entropy_at_kappa_1_is_the_design_number():
    assert VonMises(1.0).entropy == pytest.approx(1.6274014590, abs=1e-9)


@pytest.mark.parametrize("kappa", [0.0, 0.3, 1.0, 7.0, 800.0])
def test_von_mises_entropy_matches_scipy(kappa):
    stats = pytest.importorskip("scipy.stats")
    expected = math.log(2 * math.pi) if kappa == 0 else stats.vonmises(kappa).entropy()
    assert VonMises(kappa).entropy == pytest.approx(float(expected), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("kappa, mu", [(1.0, 0.0), (4.0, 2.5), (0.0, 0.0)])
def test_von_mises_log_prob_integrates_to_one(kappa, mu):
    # periodic trapezoid rule: spectrally accurate for smooth periodic integrands
    theta = torch.arange(4096, dtype=torch.float64) * (2 * math.pi / 4096)
    x = torch.stack([theta.cos(), theta.sin()], 1)
    total = VonMises(kappa, mu).log_prob(x).exp().sum() * (2 * math.pi / 4096)
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def test_von_mises_sample_moments():
    kappa, mu, n = 2.0, 0.7, 40_000
    x = VonMises(kappa, mu).sample(n, rng=np.random.default_rng(1))
    ratio = float(torch.special.i1(torch.tensor(kappa)) / torch.special.i0(torch.tensor(kappa)))
    expected = torch.tensor([math.cos(mu), math.sin(mu)], dtype=torch.float64) * ratio
    _mean_within(x, expected, "E[(cos θ, sin θ)] = A(κ)(cos μ, sin μ)")
    assert torch.allclose(x.norm(dim=1), torch.ones(n, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("dist", [VonMises(1.0), VonMises([0.5, 3.0, 1.0]), VonMisesFisher(5.0)])
def test_entropy_equals_minus_expected_log_prob(dist):
    logp = dist.log_prob(dist.sample(40_000, rng=np.random.default_rng(2)))
    _mean_within(-logp[:, None], torch.tensor([dist.entropy], dtype=torch.float64), "-E[log p]")


def test_torus_is_a_product_of_circles():
    kappas = [0.5, 2.0]
    torus = VonMises(kappas, [0.0, 1.0])
    assert (torus.d, torus.D) == (2, 4)
    assert torus.entropy == pytest.approx(sum(VonMises(k).entropy for k in kappas), rel=1e-14)
    n = 128  # periodic 2-D trapezoid rule for the integral over the torus (area element dθ1 dθ2)
    t = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    a, b = torch.meshgrid(t, t, indexing="ij")
    x = torch.stack([a.cos(), a.sin(), b.cos(), b.sin()], -1).reshape(-1, 4)
    total = torus.log_prob(x).exp().sum() * (2 * math.pi / n) ** 2
    assert total.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("kappa", [1e-6, 0.5, 3.0, 60.0])
def test_vmf_entropy_matches_scipy(kappa):
    stats = pytest.importorskip("scipy.stats")
    if not hasattr(stats, "vonmises_fisher"):
        pytest.skip("scipy < 1.11 has no vonmises_fisher")
    expected = stats.vonmises_fisher([0.0, 0.0, 1.0], kappa).entropy()
    assert VonMisesFisher(kappa).entropy == pytest.approx(float(expected), rel=1e-7)


def test_vmf_uniform_limit():
    assert VonMisesFisher(0.0).entropy == pytest.approx(math.log(4 * math.pi), rel=1e-15)
    assert VonMisesFisher(1e-9).entropy == pytest.approx(math.log(4 * math.pi), rel=1e-12)


@pytest.mark.parametrize("kappa", [0.0, 1.0, 20.0])
def test_vmf_log_prob_integrates_to_one(kappa):
    # area element dA = dw dφ with w = cos(polar angle): Gauss–Legendre in w, trapezoid in φ
    w, weights = np.polynomial.legendre.leggauss(96)
    phi = np.arange(64) * (2 * np.pi / 64)
    W, P = np.meshgrid(w, phi, indexing="ij")
    r = np.sqrt(1 - W**2)
    x = torch.from_numpy(np.stack([r * np.cos(P), r * np.sin(P), W], -1).reshape(-1, 3))
    dist = VonMisesFisher(kappa, [1.0, 2.0, -2.0])
    density = dist.log_prob(x).exp().reshape(96, 64).numpy()
    total = (density * weights[:, None]).sum() * (2 * np.pi / 64)
    assert total == pytest.approx(1.0, abs=1e-10)


def test_vmf_sample_moments():
    mu = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64) / 3
    dist = VonMisesFisher(3.0, mu.tolist())
    x = dist.sample(40_000, rng=np.random.default_rng(3))
    assert torch.allclose(x.norm(dim=1), torch.ones(40_000, dtype=torch.float64), atol=1e-14)
    _mean_within(x, dist.mean_resultant() * mu, "E[x] = A(κ) μ")
    # E[(μᵀx)²] = 1 - 2A(κ)/κ for the vMF on S²
    _mean_within(
        (x @ mu)[:, None] ** 2, torch.tensor([1 - 2 * dist.mean_resultant() / 3.0]), "E[w²]"
    )


def test_log_prob_is_taken_at_the_nearest_manifold_point():
    for dist in (VonMises([1.0, 2.0]), VonMisesFisher(2.0, [0.0, 1.0, 0.0])):
        x = dist.sample(50, rng=np.random.default_rng(4))
        scaled = x * 1.7
        assert torch.allclose(dist.project(scaled), x, atol=1e-14)
        assert torch.allclose(dist.log_prob(scaled), dist.log_prob(x), atol=1e-13)


def test_datasets_are_seeded_and_carry_the_truth():
    a = make_von_mises(n_train=100, n_val=20, n_test=30, seed=5, dtype=torch.float64)
    b = make_von_mises(n_train=100, n_val=20, n_test=30, seed=5, dtype=torch.float64)
    c = make_von_mises(n_train=100, n_val=20, n_test=30, seed=6, dtype=torch.float64)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    assert [t.shape for t in (a.train, a.val, a.test)] == [(100, 2), (20, 2), (30, 2)]
    assert (a.d, a.D) == (1, 2) and a.entropy == pytest.approx(1.6274014590)
    assert a.true_log_prob(a.test).shape == (30,)
    s = make_vmf_sphere(kappa=2.0, n_train=10, n_val=0, n_test=5)
    assert s.train.dtype == torch.float32 and (s.d, s.D) == (2, 3) and s.val.shape == (0, 3)
    t = make_von_mises_torus(d=3, kappa=[1.0, 2.0, 3.0], n_train=10, n_val=2, n_test=2)
    assert (t.d, t.D) == (3, 6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kappa must be >= 0"):
        VonMises(-1.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        VonMises([1.0, 2.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="mean_direction"):
        VonMisesFisher(1.0, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"x must be \(B, 3\)"):
        VonMisesFisher(1.0).log_prob(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="n_train"):
        make_von_mises(n_train=0)
    with pytest.raises(ValueError, match="length d = 2"):
        make_von_mises_torus(d=2, kappa=[1.0, 2.0, 3.0])
