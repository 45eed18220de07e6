"""Compose and Inverse, plus the checks every flow test uses (imported by the other files)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import jacrev

from rnf_fast.flows import AffineCoupling, Compose, Flow, Inverse, LULinear

DTYPE = torch.float64


def randomize(module: nn.Module, *, seed: int = 0, std: float = 0.3) -> nn.Module:
    """Overwrite every parameter with N(0, std²) draws (so no layer is the identity); float64."""
    module = module.to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return module


def check_flow(flow: Flow, x: Tensor, *, inverse_atol: float = 1e-10) -> None:
    """Check inverse(forward(x)) = x, the log-dets against a dense Jacobian, and batch independence.

    The Jacobian of the whole batch is taken, so cross-sample blocks must vanish too.
    """
    y, logabsdet = flow(x)
    assert logabsdet.shape == (x.shape[0],)
    x_back, inverse_logabsdet = flow.inverse(y)
    torch.testing.assert_close(x_back, x, atol=inverse_atol, rtol=0)
    torch.testing.assert_close(inverse_logabsdet, -logabsdet, atol=1e-10, rtol=0)

    B, n = x.shape[0], math.prod(x.shape[1:])
    J = jacrev(lambda v: flow(v)[0])(x).reshape(B, -1, B, n)
    assert J.shape[1] == n, "a flow must keep the dimension"
    for b in range(B):
        sign, logdet = torch.linalg.slogdet(J[b, :, b, :])
        assert sign != 0
        torch.testing.assert_close(logdet, logabsdet[b], atol=1e-8, rtol=1e-8)
        others = torch.cat([J[b, :, :b], J[b, :, b + 1 :]], dim=1)
        assert others.abs().sum() == 0, "samples must not interact"


def check_gradients(flow: Flow, x: Tensor) -> None:
    """Backpropagate a loss through forward and inverse; every parameter gets a finite gradient."""
    y, logabsdet = flow(x)
    x_back, inverse_logabsdet = flow.inverse(y.detach())
    loss = (y**2).sum() + logabsdet.sum() + (x_back**2).sum() + inverse_logabsdet.sum()
    loss.backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def normal(*shape: int, seed: int = 1, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def test_compose_sums_logdets_and_inverts_in_reverse_order():
    flow = randomize(Compose(LULinear(5), AffineCoupling(5, hidden=(7,)), LULinear(5)))
    x = normal(4, 5)
    check_flow(flow, x)
    y, total = x, torch.zeros(4, dtype=DTYPE)
    for layer in flow.layers:
        y, ld = layer(y)
        total = total + ld
    torch.testing.assert_close(flow(x), (y, total))


def test_inverse_swaps_directions():
    layer = randomize(AffineCoupling(3, hidden=(6,)))
    inv = Inverse(layer)
    x = normal(4, 3)
    torch.testing.assert_close(inv(x), layer.inverse(x))
    torch.testing.assert_close(inv.inverse(x), layer(x))
    check_flow(inv, x)
    assert list(inv.parameters())[0] is list(layer.parameters())[0]


def test_gradients_reach_every_parameter():
    check_gradients(randomize(Compose(LULinear(3), AffineCoupling(3, hidden=(4,)))), normal(5, 3))


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one layer"):
        Compose()
    with pytest.raises(TypeError, match=r"layers\[1\] must be a Flow, got Linear"):
        Compose(LULinear(2), nn.Linear(2, 2))
    with pytest.raises(TypeError, match="layer must be a Flow"):
        Inverse(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        Flow()
