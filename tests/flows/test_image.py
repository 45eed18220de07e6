"""Image layers: ConvResNet, checkerboard and channel couplings, Squeeze, reshapes, MultiScale."""

from __future__ import annotations

import pytest
import torch

from rnf_fast.flows import (
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    Compose,
    ConvResNet,
    Flatten,
    MultiScale,
    Squeeze,
    Unflatten,
)

from .test_base import DTYPE, check_flow, check_gradients, normal, randomize

SMALL = {"hidden_channels": 4, "num_blocks": 1}


@pytest.mark.parametrize("norm", ["group", None])
def test_conv_resnet_shapes_and_zero_output_at_init(norm):
    net = ConvResNet(3, 5, hidden_channels=6, num_blocks=2, norm=norm).to(DTYPE)
    out = net(normal(2, 3, 4, 5))
    assert out.shape == (2, 5, 4, 5) and out.abs().max() == 0


@pytest.mark.parametrize(("shape", "parity"), [((1, 3, 5), 0), ((3, 4, 4), 1)])
def test_checkerboard_coupling(shape, parity):
    layer = randomize(CheckerboardAffineCoupling(shape[0], parity=parity, **SMALL), std=0.5)
    x = normal(2, *shape)
    check_flow(layer, x)
    y, _ = layer(x)
    i, j = torch.meshgrid(torch.arange(shape[1]), torch.arange(shape[2]), indexing="ij")
    fixed = (i + j) % 2 != parity
    torch.testing.assert_close(y[..., fixed], x[..., fixed], atol=0, rtol=0)
    assert (y[..., ~fixed] - x[..., ~fixed]).abs().min() > 0


@pytest.mark.parametrize(("channels", "parity"), [(2, 0), (3, 0), (3, 1)])
def test_channel_coupling(channels, parity):
    layer = randomize(ChannelAffineCoupling(channels, parity=parity, **SMALL), std=0.5)
    x = normal(2, channels, 2, 3)
    check_flow(layer, x)
    y, _ = layer(x)
    fixed = slice(0, channels // 2) if parity == 0 else slice(channels // 2, channels)
    torch.testing.assert_close(y[:, fixed], x[:, fixed], atol=0, rtol=0)


def test_couplings_start_as_identity():
    x = normal(2, 4, 2, 2)
    for layer in (CheckerboardAffineCoupling(4, **SMALL), ChannelAffineCoupling(4, **SMALL)):
        y, logabsdet = layer.to(DTYPE)(x)
        torch.testing.assert_close(y, x, atol=0, rtol=0)
        assert logabsdet.abs().max() == 0


def test_squeeze_layout():
    x = normal(2, 3, 4, 6)
    y, logabsdet = Squeeze(3)(x)
    assert y.shape == (2, 12, 2, 3) and logabsdet.abs().max() == 0
    for c, p, q in [(0, 0, 0), (1, 0, 1), (2, 1, 0), (2, 1, 1)]:
        torch.testing.assert_close(y[:, 4 * c + 2 * p + q], x[:, c, p::2, q::2], atol=0, rtol=0)
    check_flow(Squeeze(3), x, inverse_atol=0)


def test_flatten_and_unflatten():
    x = normal(2, 3, 2, 5)
    y, _ = Flatten((3, 2, 5))(x)
    torch.testing.assert_close(y, x.reshape(2, 30), atol=0, rtol=0)
    check_flow(Flatten((3, 2, 5)), x, inverse_atol=0)
    check_flow(Unflatten((3, 2, 5)), y, inverse_atol=0)


def multiscale() -> MultiScale:
    layers = Compose(
        CheckerboardAffineCoupling(1, **SMALL), Squeeze(1), ChannelAffineCoupling(4, **SMALL)
    )
    rest = Compose(ChannelAffineCoupling(2, parity=1, **SMALL), Flatten((2, 2, 3)))
    return randomize(MultiScale(layers, rest, shape=(4, 2, 3)), std=0.5)


def test_multiscale_factors_out_the_first_half_of_the_channels():
    flow = multiscale()
    x = normal(2, 1, 4, 6)
    check_flow(flow, x)
    y, logabsdet = flow(x)
    inner, inner_logabsdet = flow.layers(x)
    rest, rest_logabsdet = flow.rest(inner[:, 2:])
    torch.testing.assert_close(y, torch.cat([inner[:, :2].flatten(1), rest], dim=1))
    torch.testing.assert_close(logabsdet, inner_logabsdet + rest_logabsdet)


def test_image_gradients():
    check_gradients(multiscale(), normal(2, 1, 4, 6))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"x must be \(B, 2, H, W\), got \(3, 2, 4\)"):
        CheckerboardAffineCoupling(2, **SMALL)(torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match=r"y must be \(B, 4, H, W\), got \(1, 3, 2, 2\)"):
        ChannelAffineCoupling(4, **SMALL).inverse(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="channels must be >= 2 for a channel coupling"):
        ChannelAffineCoupling(1)
    with pytest.raises(ValueError, match="parity must be 0 or 1, got 2"):
        CheckerboardAffineCoupling(1, parity=2)
    with pytest.raises(ValueError, match="norm must be one of"):
        ConvResNet(1, 2, norm="batch")
    with pytest.raises(ValueError, match="num_blocks must be an int >= 0, got -1"):
        ConvResNet(1, 2, num_blocks=-1)
    with pytest.raises(ValueError, match="x must have even H and W"):
        Squeeze(1)(torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"y must be \(B, 8, H, W\)"):
        Squeeze(2).inverse(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\), got \(2, 3\)"):
        Flatten((2, 3))
    with pytest.raises(ValueError, match=r"x must be \(B, 6\), got \(2, 2, 3\)"):
        Unflatten((1, 2, 3))(torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match=r"y must be \(B, 24\), got \(2, 23\)"):
        multiscale().inverse(torch.zeros(2, 23, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"output of layers must be \(B, 4, 2, 3\)"):
        MultiScale(Squeeze(1), Flatten((2, 2, 3)), shape=(4, 2, 3))(torch.zeros(1, 1, 2, 6))
    with pytest.raises(TypeError, match="rest must be a Flow"):
        MultiScale(Squeeze(1), torch.nn.Flatten(), shape=(4, 2, 3))
