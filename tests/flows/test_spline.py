"""Rational-quadratic splines and RationalQuadraticCoupling."""

from __future__ import annotations

import pytest
import torch

from rnf_fast.flows import RationalQuadraticCoupling, rational_quadratic_spline

from .test_base import DTYPE, check_flow, check_gradients, normal, randomize


def spline_params(m: int, K: int, *, seed: int = 2):
    return normal(m, K, seed=seed), normal(m, K, seed=seed + 1), normal(m, K - 1, seed=seed + 2)


def test_spline_is_monotone_with_the_right_derivative_and_inverse():
    K, bound = 5, 2.0
    w, h, d = (p.expand(200, -1) for p in spline_params(1, K, seed=3))
    x = torch.linspace(-3.0, 3.0, 200, dtype=DTYPE)  # covers both tails and every bin
    y, logabsdet = rational_quadratic_spline(x, w, h, d, bound=bound)
    assert (y.diff() > 0).all()
    outside = x.abs() > bound
    torch.testing.assert_close(y[outside], x[outside], atol=0, rtol=0)
    derivative = torch.func.vmap(
        torch.func.grad(lambda t, a, b, c: rational_quadratic_spline(t, a, b, c, bound=bound)[0])
    )(x, w, h, d)
    torch.testing.assert_close(logabsdet, derivative.log(), atol=1e-10, rtol=1e-10)
    x_back, inverse_logabsdet = rational_quadratic_spline(y, w, h, d, bound=bound, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=1e-10, rtol=0)


def test_spline_is_c1_at_the_bound():
    w, h, d = (p.expand(2, -1) for p in spline_params(1, 4))
    x = torch.tensor([-1.0, 1.0], dtype=DTYPE)
    y, logabsdet = rational_quadratic_spline(x, w, h, d, bound=1.0)
    torch.testing.assert_close(y, x, atol=1e-15, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros(2, dtype=DTYPE), atol=1e-12, rtol=0)


def test_zero_parameters_give_the_identity():
    x = normal(10, seed=4, scale=2.0)
    zeros = torch.zeros(10, 6, dtype=DTYPE)
    y, logabsdet = rational_quadratic_spline(x, zeros, zeros, zeros[:, :5], bound=3.0)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros_like(x), atol=1e-14, rtol=0)


@pytest.mark.parametrize(("n", "num_bins"), [(2, 4), (5, 2), (3, 9)])
def test_coupling_inverse_and_logdet(n, num_bins):
    layer = RationalQuadraticCoupling(n, hidden=(8,), num_bins=num_bins, bound=2.0)
    x = normal(5, n, scale=1.5)  # some entries beyond the bound: the tails are exercised
    assert (x.abs() > 2.0).any()
    check_flow(randomize(layer, std=0.7), x)


def test_coupling_starts_as_identity():
    layer = RationalQuadraticCoupling(3, hidden=(8,)).to(DTYPE)
    x = normal(4, 3)
    y, logabsdet = layer(x)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(logabsdet, torch.zeros(4, dtype=DTYPE), atol=1e-14, rtol=0)


def test_coupling_gradients():
    layer = randomize(RationalQuadraticCoupling(2, hidden=(5,), num_bins=3, bound=5.0))
    check_gradients(layer, normal(6, 2))


def test_coupling_bad_arguments():
    layer = RationalQuadraticCoupling(2, hidden=(4,))
    with pytest.raises(ValueError, match=r"x must be \(B, 2\), got \(4, 3\)"):
        layer(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="num_bins must be >= 2, got 1"):
        RationalQuadraticCoupling(2, num_bins=1)
    with pytest.raises(ValueError, match="bound must be finite and > 0"):
        RationalQuadraticCoupling(2, bound=-1.0)
    with pytest.raises(ValueError, match="min_bin_size must be in"):
        RationalQuadraticCoupling(2, num_bins=10, min_bin_size=0.1)
    with pytest.raises(ValueError, match="min_derivative must be in"):
        RationalQuadraticCoupling(2, min_derivative=0.0)
