"""Decoders that are not deterministic row-wise functions: Dropout and BatchNorm in training mode
(and the like) get a clear error before any work; in eval mode they are ordinary decoders."""

import pytest
import torch
from torch import nn

import rnf_fast
from rnf_fast.testing import dense_logdet, rel_error


def _decoder(layer: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), layer, nn.Tanh(), nn.Linear(8, 5)).double()


def _batchnorm() -> nn.Module:
    bn = nn.BatchNorm1d(8).double()
    with torch.no_grad():  # nontrivial running statistics, as after training
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


LAYERS = {
    "Dropout": lambda: nn.Dropout(0.3),
    "AlphaDropout": lambda: nn.AlphaDropout(0.3),
    "BatchNorm1d": _batchnorm,
    "InstanceNorm1d": lambda: nn.Sequential(
        nn.Unflatten(1, (1, 8)), nn.InstanceNorm1d(1, track_running_stats=True), nn.Flatten()
    ),
}


@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.parametrize("name", LAYERS)
def test_training_mode_layers_raise_before_any_work(name, method):
    # Before: Dropout gave a silent value (exact) or a non-positive-definite CG system,
    # BatchNorm1d a torch.func error about an in-place update of a captured tensor.
    decoder = _decoder(LAYERS[name]()).train()
    calls = []
    decoder.register_forward_hook(lambda *args: calls.append(1))
    z = torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"decoder has {name} in training mode.*decoder.eval()"):
        rnf_fast.logdet_grad(decoder, z, method)
    assert not calls  # the decoder never ran


def test_dropout_with_p_zero_is_deterministic_and_allowed():
    decoder = _decoder(nn.Dropout(0.0)).train()
    z = torch.randn(4, 2, dtype=torch.float64)
    value = rnf_fast.logdet_grad(decoder, z, "exact")
    assert rel_error(value, dense_logdet(decoder, z)) < 1e-10


def test_batchnorm_without_running_statistics_couples_rows_even_in_eval():
    decoder = _decoder(nn.BatchNorm1d(8, track_running_stats=False).double()).eval()
    z = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="BatchNorm1d without running statistics"):
        rnf_fast.logdet_grad(decoder, z)


@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.parametrize("name", ["Dropout", "BatchNorm1d"])
def test_eval_mode_matches_dense_truth(name, method):
    decoder = _decoder(LAYERS[name]()).eval()
    z = torch.randn(6, 2, dtype=torch.float64)
    truth = dense_logdet(decoder, z)
    if method == "exact":
        value = rnf_fast.logdet_grad(decoder, z, "exact")
    else:  # d orthogonal probes, run to convergence: the SLQ value is exact
        value = rnf_fast.logdet_grad(
            decoder, z, rnf_fast.CG(probes=2, probe_kind="orthogonal", tol=1e-12)
        )
    assert rel_error(value, truth) < 1e-8
