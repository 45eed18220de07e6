"""The Logit layer, the decoder-side image flow built around it, and the pixel round-trips."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from torch.func import jacrev

import rnf_fast.flows.preprocess
from rnf_fast.data import dequantize
from rnf_fast.flows import Compose, Inverse, image_flow
from rnf_fast.flows.builders import image_decoder
from rnf_fast.flows.preprocess import Logit

from .test_base import DTYPE, check_flow, normal, randomize


def pixels(*shape: int, seed: int = 0) -> torch.Tensor:
    """Uniform draws in (0, 1), float64."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
@pytest.mark.parametrize("shape", [(3, 5), (2, 1, 3, 4)])
def test_logit_inverse_and_logabsdet_against_dense_jacobian(alpha, shape):
    layer = Logit(alpha=alpha)
    check_flow(layer, pixels(*shape))
    check_flow(Inverse(layer), 3 * normal(*shape))


def test_logit_values_match_the_formula():
    alpha = 0.05
    x = pixels(4, 6)
    y, logabsdet = Logit(alpha=alpha)(x)
    p = alpha + (1 - 2 * alpha) * x
    torch.testing.assert_close(y, torch.log(p / (1 - p)), atol=1e-12, rtol=0)
    expected = (math.log(1 - 2 * alpha) - torch.log(p * (1 - p))).sum(1)
    torch.testing.assert_close(logabsdet, expected, atol=1e-12, rtol=0)


def test_logit_inverse_is_finite_for_saturated_logits_in_float32():
    y = torch.tensor([[-200.0, -30.0, 0.0, 30.0, 200.0]])
    x, logabsdet = Logit(alpha=1e-6).inverse(y)
    assert torch.isfinite(x).all() and torch.isfinite(logabsdet).all()
    # The range of the inverse is [-α, 1 - α] / (1 - 2α).
    # float32 rounds near 1 in steps of 1.2e-7.
    bound = 1e-6 / (1 - 2e-6) + 2.4e-7
    assert float(x.min()) >= -bound and float(x.max()) <= 1 + bound


def test_logit_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be in"):
        Logit(alpha=0.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        Logit(alpha=-1e-3)
    with pytest.raises(TypeError, match="alpha must be a float"):
        Logit(alpha="small")
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        Logit()(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must be a floating tensor"):
        Logit().inverse(torch.zeros(4))


def test_logit_docstring_example():
    assert doctest.testmod(rnf_fast.flows.preprocess).failed == 0


def test_dequantized_pixels_round_trip_to_their_levels_and_through_the_logit():
    levels = 256
    v = torch.randint(0, levels, (50, 12), generator=torch.Generator().manual_seed(3))
    x = dequantize(v.to(DTYPE) / levels, levels=levels, generator=torch.Generator().manual_seed(4))
    assert bool((x >= 0).all() and (x < 1).all())
    torch.testing.assert_close(torch.floor(x * levels).long(), v)
    layer = Logit(alpha=1e-6)
    y, ld = layer(x)
    x_back, ld_back = layer.inverse(y)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_back, -ld, atol=1e-8, rtol=0)


def small_decoder(alpha: float | None) -> Inverse:
    flow = image_decoder(
        (1, 4, 4), logit_alpha=alpha, num_scales=2, blocks_per_scale=1, channels=4, num_res_blocks=1
    )
    return randomize(flow, std=0.2).eval()


@pytest.mark.parametrize("alpha", [1e-6, None])
def test_image_decoder_inverse_and_logabsdet_against_dense_jacobian(alpha):
    check_flow(small_decoder(alpha), normal(2, 16), inverse_atol=1e-9)


def test_image_decoder_reads_the_data_as_an_image_and_ends_with_the_sigmoid():
    decoder = small_decoder(1e-6)
    assert isinstance(decoder.layer, Compose) and isinstance(decoder.layer.layers[0], Logit)
    core = decoder.layer.layers[1]
    x = pixels(3, 16)
    latent, _ = decoder.inverse(x)
    torch.testing.assert_close(latent, core(Logit(alpha=1e-6)(x)[0])[0])
    out, _ = decoder(normal(3, 16, scale=5.0))
    assert bool((out > -2e-6).all() and (out < 1 + 2e-6).all())
    # Without the logit, f is the RealNVP read backwards: the image side is f's output.
    bare = small_decoder(None)
    torch.testing.assert_close(bare.inverse(x)[0], bare.layer(x)[0])


def test_image_decoder_jacobian_is_the_sigmoid_times_the_logit_space_jacobian():
    decoder = small_decoder(0.05)
    core = decoder.layer.layers[1]
    y = normal(1, 16)
    J = jacrev(lambda v: decoder(v)[0])(y)[0, :, 0]
    J_logit = jacrev(lambda v: core.inverse(v)[0])(y)[0, :, 0]
    s = torch.sigmoid(core.inverse(y)[0][0])
    torch.testing.assert_close(J, (s * (1 - s) / 0.9)[:, None] * J_logit, atol=1e-12, rtol=1e-10)


def test_image_decoder_bad_arguments():
    with pytest.raises(ValueError, match="alpha must be in"):
        image_decoder((1, 4, 4), logit_alpha=0.7)
    with pytest.raises(ValueError, match="divisible"):
        image_decoder((1, 6, 6), num_scales=3)
    assert isinstance(image_decoder((1, 4, 4), logit_alpha=None).layer, type(image_flow((1, 4, 4))))
