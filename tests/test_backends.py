"""Backend listing and selection."""

import pytest
import torch

import rnf_fast
from rnf_fast.testing import mlp_decoder


def test_torch_backend_is_always_available():
    assert "torch" in rnf_fast.available_backends()
    assert rnf_fast.available_backends("cpu")[-1] == "torch"
    names = [row[0] for row in rnf_fast.backend_report()]
    assert "torch" in names


def test_explicit_backend_and_context_manager():
    dec = mlp_decoder(2, 4)
    z = torch.randn(3, 2, dtype=torch.float64)
    _, info = rnf_fast.logdet_grad(dec, z, backend="torch", return_info=True)
    assert info.backend == "torch"
    with rnf_fast.use_backend("torch"):
        _, info = rnf_fast.logdet_grad(dec, z, return_info=True)
    assert info.backend == "torch"


def test_unknown_backend_in_context_manager():
    with pytest.raises(ValueError, match="backend must be one of"), rnf_fast.use_backend("nope"):
        pass


def test_auto_method_is_reported():
    dec = mlp_decoder(2, 4)
    _, info = rnf_fast.logdet_grad(dec, torch.randn(3, 2, dtype=torch.float64), return_info=True)
    assert info.method == "exact" and info.batching == "explicit" and info.path == "explicit"
    assert info.cg is None and info.exact.gram == "tangents"
