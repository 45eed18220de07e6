"""Training objectives: ML against a dense float64 loss and gradient, the warm-up skips the log
det, two-step phases touch only their part, and the loss decreases on a tiny problem."""

from __future__ import annotations

import math

import pytest
import torch

import rnf_fast.training.objectives as objectives
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import dense_logdet, grads, rel_error
from rnf_fast.training import Objective, ml_loss, ts_loss

DTYPE = torch.float64
CONFIG = FlowConfig(D=4, d=2, f_layers=2, f_hidden=(8,), h_layers=2, h_hidden=(8,))


def data(n: int, *, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, CONFIG.D, generator=generator, dtype=DTYPE)


def model_for(x: torch.Tensor, *, std: float = 0.1) -> RectangularFlow:
    model = RectangularFlow(CONFIG).to(DTYPE)
    model.initialize(x)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return model


def dense_ml_parts(model: RectangularFlow, x: torch.Tensor, weight: float, beta: float):
    """The ML loss with the log det from a dense float64 Jacobian, and its parts."""
    z = model.encode(x)
    log_pz, logdet = model.latent_log_prob(z), dense_logdet(model.decode, z)
    log_p = log_pz - 0.5 * logdet
    recon = ((x - model.decode(z)) ** 2).sum(1)
    loss = -(weight * log_p - beta * recon).mean()
    parts = {"recon": recon, "log_pz": log_pz, "logdet": logdet, "nll": -log_p, "loss": loss}
    return loss, {k: float(v.detach().mean()) for k, v in parts.items()}


@pytest.mark.parametrize("weight", [0.3, 1.0])
def test_ml_loss_and_gradient_match_dense(weight):
    x = data(6)
    model = model_for(x)
    params = list(model.parameters())
    loss, parts = ml_loss(model, x, weight=weight, beta=7.0, method="exact")
    expected, expected_parts = dense_ml_parts(model, x, weight, 7.0)
    loss_value, expected_value = float(loss.detach()), float(expected.detach())
    assert abs(loss_value - expected_value) < 1e-10 * abs(expected_value)
    for (name, _), got, want in zip(
        model.named_parameters(), grads(loss, params), grads(expected, params)
    ):
        if float(want.norm()) < 1e-12:  # a parameter the loss does not reach: none in got
            assert float(got.norm()) < 1e-12, name
        else:
            assert rel_error(got, want) < 1e-8, name
    assert set(parts) == set(expected_parts) | {"singular"} and int(parts["singular"]) == 0
    for name, value in expected_parts.items():  # each reported part against the dense one
        assert math.isclose(float(parts[name]), value, rel_tol=1e-10, abs_tol=1e-12), name


def test_cg_loss_is_unbiased_in_value_with_many_probes():
    x = data(6)
    model = model_for(x)
    exact = ml_loss(model, x, method="exact")[1]["logdet"]
    generator = torch.Generator().manual_seed(0)
    cg = ml_loss(model, x, method="cg", probes=64, generator=generator, tol=1e-10)[1]["logdet"]
    assert abs(float(cg - exact)) < 0.05 * (1 + abs(float(exact)))
    # Unbiased: at d = 2 the Lanczos quadrature is exact, so the mean of independent 2-probe
    # estimates is the exact value within 4 standard errors of that mean.
    draws = torch.stack(
        [
            ml_loss(model, x, method="cg", probes=2, generator=generator, tol=1e-10)[1]["logdet"]
            for _ in range(200)
        ]
    )
    se = float(draws.std()) / math.sqrt(len(draws))
    assert se > 1e-6  # the estimates do vary: the bound below is not trivially met
    assert abs(float(draws.mean() - exact)) < 4 * se


def test_warmup_weight_zero_skips_the_logdet(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("logdet_grad must not run while the likelihood weight is 0")

    monkeypatch.setattr(objectives, "logdet_grad", fail)
    x = data(5)
    model = model_for(x)
    loss, parts = ml_loss(model, x, weight=0.0, beta=2.0)
    assert set(parts) == {"loss", "recon"}
    torch.testing.assert_close(loss, 2.0 * ((x - model.reconstruct(x)) ** 2).sum(1).mean())
    loss.backward()
    assert all(p.grad is None for p in model.h.parameters())


def test_ml_without_logdet_uses_only_the_latent_density():
    x = data(5)
    model = model_for(x)
    loss, parts = Objective(model, kind="ml-no-logdet", beta=3.0)(x)
    assert "logdet" not in parts and "nll" not in parts
    z = model.encode(x)
    expected = -(model.latent_log_prob(z) - 3.0 * ((x - model.decode(z)) ** 2).sum(1)).mean()
    torch.testing.assert_close(loss, expected)


def test_two_step_phases_train_only_their_part():
    x = data(5)
    model = model_for(x)
    loss, parts = ts_loss(model, x, phase="manifold", beta=2.0)
    loss.backward()
    assert all(p.grad is None for p in model.h.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.f.parameters())
    model.zero_grad(set_to_none=True)
    loss, parts = ts_loss(model, x, phase="density")
    loss.backward()
    assert all(p.grad is None for p in model.f.parameters())
    torch.testing.assert_close(parts["log_pz"], model.latent_log_prob(model.encode(x)).mean())


def test_loss_decreases_on_a_tiny_problem():
    angle = torch.linspace(0, 1.5, 64, dtype=DTYPE)
    x = torch.stack([angle.cos(), angle.sin(), 0.5 * angle], dim=1)
    model = RectangularFlow(FlowConfig(D=3, d=1, f_layers=2, f_hidden=(16,))).to(DTYPE)
    model.initialize(x)
    objective = Objective(model, kind="ml", method="exact", beta=10.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss, _ = objective(x)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5, losses


def test_bad_options_raise():
    model = model_for(data(5))
    with pytest.raises(ValueError, match="kind must be one of"):
        Objective(model, kind="mle")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        Objective(model, beta=-1.0)
    with pytest.raises(ValueError, match="phase must be one of .* for kind 'ts', got None"):
        Objective(model, kind="ts")(data(5))
    with pytest.raises(ValueError, match="phase must be one of"):
        ts_loss(model, data(5), phase="both")
