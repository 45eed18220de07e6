"""MLP conditioner and AffineCoupling."""

from __future__ import annotations

import pytest
import torch

from rnf_fast.flows import MLP, AffineCoupling

from .test_base import DTYPE, check_flow, check_gradients, normal, randomize


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu", "silu", "elu", "softplus"])
def test_mlp_shapes_and_zero_output_at_init(activation):
    net = MLP(3, 7, hidden=(5, 4), activation=activation).to(DTYPE)
    out = net(normal(6, 3))
    assert out.shape == (6, 7)
    assert out.abs().max() == 0
    assert randomize(net)(normal(6, 3)).abs().max() > 0


def test_mlp_without_hidden_layers_is_one_linear_layer():
    net = MLP(3, 2, hidden=())
    assert len(net.linears) == 1


@pytest.mark.parametrize("n", [2, 5])
def test_affine_coupling_inverse_and_logdet(n):
    check_flow(randomize(AffineCoupling(n, hidden=(8, 8)), std=0.5), normal(4, n))


def test_affine_coupling_with_mask_and_relu():
    mask = torch.tensor([True, False, True, True, False, False, True])
    layer = randomize(AffineCoupling(7, hidden=(6,), mask=mask, activation="relu"), std=0.5)
    x = normal(3, 7)
    check_flow(layer, x)
    y, _ = layer(x)
    torch.testing.assert_close(y[:, ~mask], x[:, ~mask], atol=0, rtol=0)
    assert (y[:, mask] - x[:, mask]).abs().min() > 0


def test_affine_coupling_starts_as_identity():
    layer = AffineCoupling(5, hidden=(8,)).to(DTYPE)
    x = normal(4, 5)
    y, logabsdet = layer(x)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert logabsdet.abs().max() == 0


def test_log_scale_is_soft_clamped():
    layer = randomize(AffineCoupling(4, hidden=(8,), log_scale_clamp=1.5), std=30.0)
    _, logabsdet = layer(normal(16, 4))
    assert logabsdet.abs().max() < 2 * 1.5  # two transformed features, each |s| < 1.5
    assert logabsdet.abs().max() > 2 * 1.4  # the clamp is active: raw scales are huge


def test_affine_coupling_gradients():
    check_gradients(randomize(AffineCoupling(3, hidden=(5,))), normal(6, 3))


def test_affine_coupling_bad_arguments():
    layer = AffineCoupling(6, hidden=(4,))
    with pytest.raises(ValueError, match=r"x must be \(B, 6\), got \(3, 5\)"):
        layer(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"y must be \(B, 6\), got \(6,\)"):
        layer.inverse(torch.zeros(6))
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        layer(torch.zeros(3, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="features must be >= 2"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match=r"mask must be \(4,\)"):
        AffineCoupling(4, mask=[True, False])
    with pytest.raises(ValueError, match="at least one True and one False"):
        AffineCoupling(3, mask=[True, True, True])
    with pytest.raises(TypeError, match="mask must be boolean"):
        AffineCoupling(2, mask=[1, 0])
    with pytest.raises(ValueError, match="log_scale_clamp must be finite and > 0"):
        AffineCoupling(2, log_scale_clamp=0.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        AffineCoupling(2, activation="sigmoid")
    with pytest.raises(ValueError, match=r"hidden\[1\] must be >= 1, got 0"):
        AffineCoupling(2, hidden=(3, 0))
