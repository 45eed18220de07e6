"""flat_flow and image_flow."""

from __future__ import annotations

import doctest

import pytest
import torch

import rnf_fast.flows
from rnf_fast.flows import (
    ActNorm,
    AffineCoupling,
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    Compose,
    LULinear,
    MultiScale,
    Permutation,
    RationalQuadraticCoupling,
    flat_flow,
    image_flow,
)

from .test_base import DTYPE, check_flow, check_gradients, normal, randomize


def initialise_actnorms(flow: Compose, x: torch.Tensor) -> None:
    """Run one training-mode forward so every ActNorm initialises, then switch to eval."""
    flow.train()
    flow(x)
    assert all(bool(m.initialized) for m in flow.modules() if isinstance(m, ActNorm))
    flow.eval()


@pytest.mark.parametrize(("n", "coupling"), [(3, "affine"), (2, "spline"), (5, "spline")])
def test_flat_flow(n, coupling):
    flow = flat_flow(
        n, num_layers=2, hidden=(6,), coupling=coupling, generator=torch.Generator().manual_seed(0)
    )
    kinds = [type(m) for m in flow.layers]
    step = [ActNorm, Permutation, LULinear]
    step.append(AffineCoupling if coupling == "affine" else RationalQuadraticCoupling)
    assert kinds == 2 * step
    randomize(flow, std=0.4)
    x = normal(4, n)
    initialise_actnorms(flow, x)
    check_flow(flow, x)
    check_gradients(flow, x)


def test_flat_flow_without_actnorm_and_lu_starts_as_identity():
    flow = flat_flow(4, num_layers=3, hidden=(5,), actnorm=False, lu=False).to(DTYPE)
    assert [type(m) for m in flow.layers] == 3 * [Permutation, AffineCoupling]
    x = normal(3, 4)
    y, logabsdet = flow(x)
    torch.testing.assert_close(y.sort(1).values, x.sort(1).values, atol=0, rtol=0)
    torch.testing.assert_close(flow.inverse(y)[0], x, atol=0, rtol=0)
    assert logabsdet.abs().max() == 0


@pytest.mark.parametrize(("shape", "num_scales"), [((1, 4, 4), 2), ((2, 2, 6), 2), ((1, 2, 2), 1)])
def test_image_flow(shape, num_scales):
    flow = image_flow(
        shape, num_scales=num_scales, blocks_per_scale=2, channels=4, num_res_blocks=1
    )
    randomize(flow, std=0.3)
    D = shape[0] * shape[1] * shape[2]
    x = normal(2, D)
    initialise_actnorms(flow, x)
    check_flow(flow, x)
    check_gradients(flow, x)


def test_image_flow_structure():
    flow = image_flow((1, 8, 8), num_scales=3, blocks_per_scale=3, channels=4, actnorm=False)
    couplings = [
        type(m).__name__
        for m in flow.modules()
        if isinstance(m, CheckerboardAffineCoupling | ChannelAffineCoupling)
    ]
    expected = 2 * (3 * ["CheckerboardAffineCoupling"] + 3 * ["ChannelAffineCoupling"])
    assert couplings == expected + 4 * ["CheckerboardAffineCoupling"]
    scales = [m.shape for m in flow.modules() if isinstance(m, MultiScale)]
    assert scales == [(4, 4, 4), (8, 2, 2)]


def test_float32_round_trip():
    flow = randomize(image_flow((1, 4, 4), channels=4, num_res_blocks=1)).float()
    x = normal(3, 16).float()
    initialise_actnorms(flow, x)
    y, logabsdet = flow(x)
    assert y.dtype == logabsdet.dtype == torch.float32
    x_back, inverse_logabsdet = flow.inverse(y)
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=1e-4, rtol=0)


def test_package_docstring_example():
    assert doctest.testmod(rnf_fast.flows).failed == 0


def test_builders_bad_arguments():
    with pytest.raises(ValueError, match="n must be >= 2 for a coupling flow, got 1"):
        flat_flow(1)
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        flat_flow(3, num_layers=0)
    with pytest.raises(ValueError, match="coupling must be one of"):
        flat_flow(3, coupling="neural")
    with pytest.raises(ValueError, match=r"divisible by 2\*\*\(num_scales - 1\) = 4"):
        image_flow((1, 6, 6), num_scales=3)
    with pytest.raises(ValueError, match=r"shape must be \(C, H, W\)"):
        image_flow((6, 6))
    with pytest.raises(ValueError, match="blocks_per_scale must be >= 1, got 0"):
        image_flow((1, 4, 4), blocks_per_scale=0)
