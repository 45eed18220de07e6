"""One decoder primal per call: the explicit linearizations run the decoder once, with its graph
when grad is enabled, and the surrogate, the factored Gram and the ML loss's reconstruction reuse
it; the MLP surrogate's inner product is taken in the hidden space before the last Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnf_fast
from rnf_fast.engine.estimator import tangent_inner
from rnf_fast.linearize.flows import PaddedFlowLinearization
from rnf_fast.linearize.modules import SequentialLinearization
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import grads, mlp_decoder, rel_error
from rnf_fast.training import ml_loss

DTYPE = torch.float64


def _mlp(out_activation: bool = False) -> nn.Sequential:
    decoder = mlp_decoder(3, 40, hidden=(16, 12), dtype=DTYPE, seed=4)
    return nn.Sequential(*decoder, nn.Tanh()) if out_activation else decoder


def _z(B: int = 5, d: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(B, d, generator=generator, dtype=DTYPE, requires_grad=True)


def _count_linear_calls(monkeypatch) -> list[int]:
    calls = [0]
    forward = nn.Linear.forward

    def counted(self, x):
        calls[0] += 1
        return forward(self, x)

    monkeypatch.setattr(nn.Linear, "forward", counted)
    return calls


@pytest.mark.parametrize("method", ["cg", "exact", rnf_fast.Exact(chunk_size=2)])
def test_a_logdet_grad_call_runs_the_mlp_once_without_its_final_linear(monkeypatch, method):
    # Before: a no-grad primal for the factors, then another with the graph for the surrogate
    # (or the factored Gram): each Linear ran twice per call. Then: once each, the final
    # (widest) Linear too, which the log det does not need: it runs only for info.output.
    decoder = _mlp()
    calls = _count_linear_calls(monkeypatch)
    value, info = rnf_fast.logdet_grad(decoder, _z(), method, return_info=True)
    assert calls[0] == 2, f"{calls[0]} Linear calls for the 2 hidden layers"
    value.sum().backward()
    assert calls[0] == 2, "the backward ran the decoder again"
    first = info.output
    assert first.shape == (5, 40) and calls[0] == 3
    assert info.output is first and calls[0] == 3, "info.output ran the final Linear twice"


@pytest.mark.parametrize("where", ["bias", "weight", "hidden"])
def test_a_non_finite_output_is_still_an_error_naming_its_samples(where):
    decoder, z = _mlp(), _z()
    with torch.no_grad():
        if where == "bias":
            decoder[-1].bias[3] = float("nan")
        elif where == "weight":
            decoder[-1].weight[0, 0] = float("inf")
        else:
            decoder[0].bias[0] = float("inf")  # tanh(inf) = 1: finite; make it NaN instead
            decoder[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"decoder output contains NaN or Inf in 5 of 5 samples"):
        rnf_fast.logdet_grad(decoder, z, "cg")


def test_an_overflow_from_finite_inputs_is_caught_in_float16():
    # fp16's range is small: there the output is computed and checked, not inferred.
    decoder, z = _mlp(), _z()
    lin = SequentialLinearization(decoder.half(), z.half())
    assert lin.output_spec() is None
    with torch.no_grad():
        decoder[-3].bias.fill_(10.0)  # the last hidden layer saturates at tanh = 1
        decoder[-1].weight.fill_(6e4)  # finite in float16; 12 such terms are not
    with pytest.raises(ValueError, match="NaN or Inf"):
        rnf_fast.logdet_grad(decoder, z.half().requires_grad_(), "cg")


def test_the_output_under_autocast_is_what_the_decoder_gives_there():
    decoder = mlp_decoder(3, 40, hidden=(16, 12), seed=4, dtype=torch.float32)
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, info = rnf_fast.logdet_grad(decoder, z, "cg", return_info=True)
        expected = decoder(z)
    assert info.output.dtype == torch.bfloat16
    assert torch.equal(info.output, expected)


@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Sequential(nn.Linear(3, 40)),  # one Linear: nothing before it
        lambda: nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 40), nn.Tanh()),
    ],
    ids=["single-linear", "activation-last"],
)
def test_decoders_without_a_skippable_final_linear_run_whole(build):
    decoder = build()
    z = torch.randn(4, 3, dtype=next(decoder.parameters()).dtype)
    lin = SequentialLinearization(decoder, z)
    assert lin.output_spec() is None


def test_a_final_linear_of_another_dtype_still_fails_at_construction():
    # Not skipped (its parameters' dtype differs), so it fails where the decoder itself would.
    decoder = nn.Sequential(nn.Linear(3, 8).double(), nn.Tanh(), nn.Linear(8, 40).float())
    with pytest.raises(RuntimeError, match="same dtype"):
        SequentialLinearization(decoder, torch.randn(4, 3, dtype=torch.float64))


def test_the_ml_loss_runs_the_decoder_once(monkeypatch):
    # The reconstruction reuses the decoder output of the log det's linearization: the flow's
    # primal runs once, and RectangularFlow.decode (the separate reconstruction) not at all.
    config = FlowConfig(D=4, d=2, f_layers=2, f_hidden=(8,), h_layers=1, h_hidden=(8,))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    model = RectangularFlow(config).to(DTYPE)
    model.initialize(x)
    primals, decodes = [0], [0]
    primal, decode = PaddedFlowLinearization._primal, RectangularFlow.decode

    def counted_primal(self, z):
        primals[0] += 1
        return primal(self, z)

    def counted_decode(self, z):
        decodes[0] += 1
        return decode(self, z)

    monkeypatch.setattr(PaddedFlowLinearization, "_primal", counted_primal)
    monkeypatch.setattr(RectangularFlow, "decode", counted_decode)
    loss, _ = ml_loss(model, x, method="cg", generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert (primals[0], decodes[0]) == (1, 0)
    ml_loss(model, x, weight=0.0)  # no log det: the reconstruction decodes on its own
    assert (primals[0], decodes[0]) == (1, 1)


@pytest.mark.parametrize("kind", ["mlp", "flow"])
def test_info_output_is_the_decoder_output_with_its_graph(kind):
    if kind == "mlp":
        decoder, z = _mlp(), _z()
        params = list(decoder.parameters())
    else:
        config = FlowConfig(D=5, d=2, f_layers=2, f_hidden=(8,), h_layers=1, h_hidden=(8,))
        model = RectangularFlow(config).to(DTYPE)
        decoder, z, params = model.decoder, _z(d=2), list(model.f.parameters())
    _, info = rnf_fast.logdet_grad(decoder, z, "cg", return_info=True)
    expected = decoder(z)
    assert torch.equal(info.output, expected)
    weights = torch.linspace(-1, 1, expected.numel(), dtype=DTYPE).view_as(expected)
    for got, want in zip(
        grads((weights * info.output).sum(), [z, *params]),
        grads((weights * expected).sum(), [z, *params]),
    ):
        assert rel_error(got, want) < 1e-14
    with torch.no_grad():
        _, info = rnf_fast.logdet_grad(decoder, z, "cg", return_info=True)
    assert info.output is None


@pytest.mark.parametrize("out_activation", [False, True], ids=["linear-last", "tanh-last"])
def test_the_hidden_space_inner_product_matches_the_output_space_one(out_activation):
    # ⟨w, J v⟩ = ⟨w W₃, M v⟩ with w held fixed: same value and gradients (z and every
    # parameter, W₃ included) as the product in the output space, to float64 rounding.
    decoder, z = _mlp(out_activation), _z()
    lin = SequentialLinearization(decoder, z)
    assert (lin.jvp_hidden(torch.zeros(5, 2, 3, dtype=DTYPE)) is None) == out_activation
    generator = torch.Generator().manual_seed(3)
    V = torch.randn(5, 2, 3, generator=generator, dtype=DTYPE)
    W = torch.randn(5, 2, 40, generator=generator, dtype=DTYPE)
    hidden = tangent_inner(lin, V, W)
    full = (W * lin.jvp(V, create_graph=True)).sum((1, 2))
    assert rel_error(hidden.detach(), full.detach()) < 1e-14
    inputs = [z, *decoder.parameters()]
    # Both share the linearization's primal graph: the first backward keeps it.
    got = torch.autograd.grad(hidden.sum(), inputs, retain_graph=True, allow_unused=True)
    for x, g, want in zip(inputs, got, grads(full.sum(), inputs)):
        assert rel_error(torch.zeros_like(x) if g is None else g, want) < 1e-13


def test_a_linearization_built_without_grad_still_gives_a_differentiable_jvp():
    # No graph was recorded at construction: jvp(create_graph=True) runs the primal again
    # with it (the path of preconditioners and callers that linearize under no_grad).
    decoder, z = _mlp(), _z()
    with torch.no_grad():
        lin = SequentialLinearization(decoder, z)
    assert lin.output is None
    V = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    JV = lin.jvp(V, create_graph=True)
    expected = SequentialLinearization(decoder, z).jvp(V, create_graph=True)
    assert torch.equal(JV, expected)
    inputs = [z, *decoder.parameters()]
    for got, want in zip(grads(JV.sum(), inputs), grads(expected.sum(), inputs)):
        assert torch.equal(got, want)
