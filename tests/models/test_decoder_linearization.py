"""RectangularFlow.decoder: the explicit linearization of f ∘ perm ∘ pad against the generic
torch.func path, for the flat affine, spline and image models, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import rnf_fast
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import dense_jacobian
from rnf_fast.training.objectives import ml_loss

DTYPE = torch.float64

CONFIGS = {
    "affine": FlowConfig(D=5, d=2, f_layers=2, f_hidden=(7, 6), h_layers=1, h_hidden=(4,)),
    "spline": FlowConfig(
        D=6, d=3, f_layers=2, f_hidden=(7,), f_coupling="spline", num_bins=4, h_layers=1
    ),
    "d=1": FlowConfig(D=2, d=1, f_layers=3, f_hidden=(8, 8), h_layers=1, seed=2),
    "image": FlowConfig(
        D=16,
        d=3,
        image_shape=(1, 4, 4),
        image_scales=2,
        image_blocks=1,
        image_channels=4,
        image_res_blocks=1,
        logit_alpha=0.05,
    ),
}


def data(config: FlowConfig, n: int, *, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    if config.image_shape is not None:  # pixels in (0, 1) for the logit layer
        return 0.1 + 0.8 * torch.rand(n, config.D, generator=generator, dtype=DTYPE)
    return 0.5 + torch.randn(n, config.D, generator=generator, dtype=DTYPE)


def randomized(config: FlowConfig, *, std: float = 0.1) -> RectangularFlow:
    """A float64 model with ActNorm initialised and every parameter moved off its initial value
    (the conditioners' last layers start at zero)."""
    model = RectangularFlow(config).to(DTYPE)
    model.initialize(data(config, 64))
    generator = torch.Generator().manual_seed(config.seed + 11)
    std = std / 4 if config.image_shape is not None else std
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return model


def latents(model: RectangularFlow, n: int = 5) -> Tensor:
    with torch.no_grad():
        return model.encode(data(model.config, n, seed=3))


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request: pytest.FixtureRequest) -> RectangularFlow:
    return randomized(CONFIGS[request.param])


def test_decoder_is_decode_and_fully_explicit(model: RectangularFlow) -> None:
    z = latents(model)
    lin = rnf_fast.linearize(model.decoder, z)
    assert lin.batching == "explicit" and lin.fallback_reason is None
    with torch.no_grad():
        x = model.decode(z)
    assert torch.equal(model.decoder(z), x)
    assert rel(lin.out, x) < 1e-13


def test_jacobian_products_match_dense_jacobian(model: RectangularFlow) -> None:
    z = latents(model)
    J = dense_jacobian(model.decode, z)  # (B, D, d)
    lin = model.decoder.linearize(z)
    generator = torch.Generator().manual_seed(5)
    V = torch.randn(z.shape[0], 3, model.d, generator=generator, dtype=DTYPE)
    JV, JtJV = lin.gram_mv(V)
    assert rel(JV, torch.einsum("bDd,bkd->bkD", J, V)) < 1e-11
    assert rel(JtJV, torch.einsum("bDd,bkD->bkd", J, JV)) < 1e-11
    assert rel(lin.jvp(V, create_graph=True).detach(), JV) < 1e-13


def _value_and_grads(model: RectangularFlow, decoder, z: Tensor, **options) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    z = z.clone().requires_grad_()
    ld = rnf_fast.logdet_grad(decoder, z, **options)
    ld.sum().backward()
    params = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return [ld.detach(), z.grad, torch.cat([g.flatten() for g in params])]


@pytest.mark.parametrize("method", ["exact", "exact-chunked", "cg"])
def test_logdet_grad_fast_equals_generic(model: RectangularFlow, method: str) -> None:
    """Same value and gradients (to z and every parameter) as logdet_grad(model.decode, z)."""
    z = latents(model)
    if method == "cg":
        generator = torch.Generator().manual_seed(6)
        probes = torch.randn(z.shape[0], 2, model.d, generator=generator, dtype=DTYPE)
        options = {"method": "cg", "probes": probes, "tol": 1e-10, "max_iter": 4 * model.d}
    else:
        options = {"method": "exact", "chunk_size": 1 if method == "exact-chunked" else None}
    fast = _value_and_grads(model, model.decoder, z, **options)
    generic = _value_and_grads(model, model.decode, z, batching="vmap", **options)
    for name, a, b in zip(("value", "z grad", "parameter grads"), fast, generic, strict=True):
        assert rel(a, b) < 1e-9, name


def test_auto_method_sees_the_explicit_path(model: RectangularFlow) -> None:
    z = latents(model)
    _, info = rnf_fast.logdet_grad(model.decoder, z, return_info=True)
    assert info.batching == "explicit"
    assert info.method == rnf_fast.choose_method(model.d, 1, path="explicit")


def test_ml_loss_uses_the_decoder_with_generic_gradients() -> None:
    """The ML objective's gradient equals the same loss assembled with the generic decoder."""
    model = randomized(CONFIGS["affine"])
    x = data(model.config, 8, seed=7)

    def manual() -> Tensor:
        z = model.encode(x)
        sq_error = ((x - model.decode(z)) ** 2).sum(1).mean()
        ld = rnf_fast.logdet_grad(model.decode, z, method="exact", batching="vmap")
        return 50.0 * sq_error - (model.latent_log_prob(z) - 0.5 * ld).mean()

    grads = []
    for loss_fn in (lambda: ml_loss(model, x, method="exact")[0], manual):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel(grads[0], grads[1]) < 1e-10


def test_linearize_checks_z() -> None:
    model = randomized(CONFIGS["affine"])
    with pytest.raises(ValueError, match=r"z must be \(B, d\) = \(B, 2\)"):
        model.decoder.linearize(torch.zeros(4, 3, dtype=DTYPE))
