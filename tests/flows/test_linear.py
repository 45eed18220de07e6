"""Permutation, Reverse and LULinear."""

from __future__ import annotations

import pytest
import torch

from rnf_fast.flows import LULinear, Permutation, Reverse

from .test_base import DTYPE, check_flow, check_gradients, normal, randomize


def test_permutation_is_reproducible_and_saved():
    a = Permutation(7, generator=torch.Generator().manual_seed(3))
    b = Permutation(7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.perm, b.perm)
    assert not torch.equal(a.perm, torch.arange(7))
    c = Permutation(7, generator=torch.Generator().manual_seed(4))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.perm, a.perm)


@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 3, 2)])
def test_permutation_inverse_and_logdet(shape):
    layer = Permutation(shape[1], generator=torch.Generator().manual_seed(0))
    x = normal(*shape)
    check_flow(layer, x, inverse_atol=0)
    torch.testing.assert_close(layer(x)[0], x[:, layer.perm], atol=0, rtol=0)


def test_reverse():
    x = normal(3, 5)
    y, logabsdet = Reverse(5)(x)
    torch.testing.assert_close(y, x.flip(1), atol=0, rtol=0)
    check_flow(Reverse(5), x, inverse_atol=0)


def test_reverse_does_not_touch_the_global_generator():
    state = torch.random.get_rng_state()
    Reverse(4)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_lu_linear_starts_as_identity():
    layer = LULinear(4).to(DTYPE)
    x = normal(3, 4)
    y, logabsdet = layer(x)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert logabsdet.abs().max() == 0


@pytest.mark.parametrize("n", [1, 2, 5])
def test_lu_linear_inverse_and_logdet(n):
    layer = randomize(LULinear(n), std=0.5)
    check_flow(layer, normal(4, n))
    L, U = layer.factors()
    torch.testing.assert_close(layer.weight(), L @ U)


def test_lu_linear_gradients():
    check_gradients(randomize(LULinear(3)), normal(5, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"x must be \(B, 3\), got \(2, 4\)"):
        LULinear(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"y must be \(B, 3\), got \(2, 3, 1\)"):
        LULinear(3).inverse(torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match=r"x must be \(B, 3\) or \(B, 3, H, W\)"):
        Permutation(3)(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="features must be >= 1, got 0"):
        LULinear(0)
    with pytest.raises(TypeError, match="num_features must be an int, got float"):
        Permutation(2.0)
    with pytest.raises(ValueError, match="num_features must be >= 1, got -1"):
        Reverse(-1)
