"""ActNorm: data-dependent initialisation, state_dict round trip, log-det."""

from __future__ import annotations

import io

import pytest
import torch

from rnf_fast.flows import ActNorm

from .test_base import DTYPE, check_flow, check_gradients, normal, randomize


def data(*shape: int) -> torch.Tensor:
    return 3.0 + 2.5 * normal(*shape)


@pytest.mark.parametrize("shape", [(64, 5), (16, 3, 4, 5)])
def test_first_training_forward_standardises_its_output(shape):
    layer = ActNorm(shape[1]).to(DTYPE)
    assert not layer.initialized
    y, _ = layer(data(*shape))
    dims = [0, *range(2, len(shape))]
    torch.testing.assert_close(y.mean(dims), torch.zeros(shape[1], dtype=DTYPE), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std(dims, correction=0), torch.ones(shape[1], dtype=DTYPE))
    assert layer.initialized
    loc = layer.loc.clone()
    layer(normal(*shape, seed=9))  # later batches do not re-initialise
    torch.testing.assert_close(layer.loc, loc, atol=0, rtol=0)


def test_first_training_inverse_standardises_the_inverse_output():
    layer = ActNorm(4).to(DTYPE)
    x, _ = layer.inverse(data(32, 4))
    torch.testing.assert_close(x.mean(0), torch.zeros(4, dtype=DTYPE), atol=1e-12, rtol=0)
    torch.testing.assert_close(x.std(0, correction=0), torch.ones(4, dtype=DTYPE))


def test_eval_mode_does_not_initialise():
    layer = ActNorm(3).to(DTYPE).eval()
    x = data(8, 3)
    y, logabsdet = layer(x)
    torch.testing.assert_close(y, x, atol=0, rtol=0)
    assert not layer.initialized and logabsdet.abs().max() == 0


def test_constant_features_keep_unit_scale():
    x = torch.cat([data(10, 2), torch.zeros(10, 1, dtype=DTYPE)], dim=1)
    layer = ActNorm(3).to(DTYPE)
    layer.initialize(x)
    assert layer.log_scale[2] == 0 and layer.loc[2] == 0


def test_state_dict_round_trip_is_never_reinitialised():
    layer = ActNorm(3).to(DTYPE)
    layer(data(20, 3))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    loaded = ActNorm(3).to(DTYPE)
    loaded.load_state_dict(torch.load(buffer))
    assert loaded.initialized and loaded.training
    x = normal(20, 3, seed=5)
    torch.testing.assert_close(loaded(x), layer(x))


def test_loading_an_uninitialised_state_reenables_initialisation():
    layer = ActNorm(2).to(DTYPE)
    layer(data(10, 2))
    layer.load_state_dict(ActNorm(2).to(DTYPE).state_dict())
    y, _ = layer(data(10, 2))
    assert layer.initialized
    torch.testing.assert_close(y.std(0, correction=0), torch.ones(2, dtype=DTYPE))


def test_explicit_initialize_then_forward_keeps_it():
    layer = ActNorm(3).to(DTYPE)
    layer.initialize(data(30, 3))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(normal(30, 3, seed=7))
    for key, value in layer.state_dict().items():
        torch.testing.assert_close(value, state[key], atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 2, 3)])
def test_inverse_and_logdet(shape):
    layer = randomize(ActNorm(shape[1]), std=0.8)
    layer.initialized.fill_(True)
    check_flow(layer, normal(*shape))
    check_gradients(layer, normal(*shape))


def test_bad_arguments():
    layer = ActNorm(3)
    with pytest.raises(ValueError, match=r"x must be \(B, 3\) or \(B, 3, H, W\), got \(4, 2\)"):
        layer(torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"y must be \(B, 3\) or \(B, 3, H, W\), got \(4, 3, 2\)"):
        layer.inverse(torch.zeros(4, 3, 2))
    with pytest.raises(ValueError, match="at least 2 values per feature"):
        layer(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        ActNorm(0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        ActNorm(2, eps=0.0)
