"""Embedded manifolds: on the manifold to rounding; the isometry keeps density and entropy."""

import math

import numpy as np
import pytest
import torch

from rnf_fast.data import (
    Embedded,
    VonMises,
    VonMisesFisher,
    make_embedded_circle,
    make_embedded_sphere,
    make_embedded_torus,
    random_isometry,
)


@pytest.mark.parametrize("D, m", [(10, 3), (257, 2), (5, 5)])
def test_random_isometry_has_orthonormal_columns_and_is_seeded(D, m):
    Q = random_isometry(D, m, seed=3)
    assert Q.shape == (D, m) and Q.dtype == torch.float64
    assert torch.allclose(Q.T @ Q, torch.eye(m, dtype=torch.float64), atol=1e-14)
    assert torch.equal(Q, random_isometry(D, m, seed=3))
    assert not torch.equal(Q, random_isometry(D, m, seed=4))


@pytest.mark.parametrize(
    "make, d", [(make_embedded_circle, 1), (make_embedded_sphere, 2), (make_embedded_torus, 2)]
)
def test_samples_lie_on_the_embedded_manifold(make, d):
    ds = make(D=101, n_train=500, n_val=10, n_test=10, dtype=torch.float64)
    Q = ds.info["isometry"]
    x = ds.train
    assert (ds.d, ds.D) == (d, 101)
    # in the range of Q: projecting back and forth changes nothing
    assert (x - (x @ Q) @ Q.T).abs().max().item() < 1e-12
    # and on the base manifold: the distance to the true manifold is rounding
    assert (x - ds.project(x)).norm(dim=1).max().item() < 1e-12
    base = ds.info["distribution"].base
    assert (x @ Q - base.project(x @ Q)).abs().max().item() < 1e-12


@pytest.mark.parametrize(
    "base", [VonMises(2.0), VonMisesFisher(4.0, [1.0, 0.0, 1.0]), VonMises([1.0, 0.3])]
)
def test_isometry_preserves_density_and_entropy(base):
    emb = Embedded(base, D=40, seed=7)
    y = base.sample(200, rng=np.random.default_rng(0))
    x = y @ emb.isometry.T
    assert torch.allclose(emb.log_prob(x), base.log_prob(y), atol=1e-13)
    assert emb.entropy == base.entropy and emb.d == base.d
    # moving off the manifold along the normal space leaves the density at the projection unchanged
    Q = emb.isometry
    normal = torch.randn(200, 40, dtype=torch.float64)
    normal = normal - (normal @ Q) @ Q.T
    assert torch.allclose(emb.project(x + 0.1 * normal), x, atol=1e-13)
    assert torch.allclose(emb.log_prob(x + 0.1 * normal), emb.log_prob(x), atol=1e-13)


def test_embedded_entropy_equals_minus_expected_log_prob():
    ds = make_embedded_torus(
        d=3, D=64, kappa=1.5, n_train=30_000, n_val=0, n_test=0, dtype=torch.float64
    )
    logp = ds.true_log_prob(ds.train)
    se = logp.std().item() / math.sqrt(logp.numel())
    assert abs(-logp.mean().item() - ds.entropy) < 4.5 * se
    assert ds.entropy == pytest.approx(3 * VonMises(1.5).entropy)


def test_embedding_seed_is_independent_of_the_sampling_seed():
    a = make_embedded_sphere(D=12, n_train=5, n_val=1, n_test=1, seed=0)
    b = make_embedded_sphere(D=12, n_train=5, n_val=1, n_test=1, seed=1)
    c = make_embedded_sphere(D=12, n_train=5, n_val=1, n_test=1, seed=0, embedding_seed=1)
    assert torch.equal(a.info["isometry"], b.info["isometry"])
    assert not torch.equal(a.info["isometry"], c.info["isometry"])
    assert not torch.equal(a.train, b.train)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="D must be an int >= 3"):
        Embedded(VonMisesFisher(), D=2)
    with pytest.raises(ValueError, match=r"x must be \(B, 10\)"):
        Embedded(VonMises(), D=10).log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="1 <= m <= D"):
        random_isometry(3, 4)
    with pytest.raises(ValueError, match="d must be an int"):
        make_embedded_torus(d=0)
