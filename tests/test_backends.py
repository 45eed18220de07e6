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


def test_auto_rule_follows_the_measured_costs():
    from rnf_fast.engine.api import AUTO_EXACT_OVER_CG1

    for path, table in AUTO_EXACT_OVER_CG1.items():
        for d, ratio in table:
            chosen = rnf_fast.choose_method(d, 1, path=path)
            # The chosen method's measured time over the faster one's: at most a near-tie.
            assert (max(ratio, 1.0) if chosen == "exact" else max(1 / ratio, 1.0)) <= 1.15
    assert rnf_fast.choose_method(16, 1, path="generic") == "exact"
    assert rnf_fast.choose_method(64, 1, path="explicit") == "cg"
    assert rnf_fast.choose_method(16, 4, path="explicit") == "exact"  # 4 probes cost more
    assert rnf_fast.choose_method(64, 4, path="explicit") == "cg"
    assert rnf_fast.choose_method(2, 1, path="explicit") == "exact"  # clamped below the table
    with pytest.raises(ValueError, match="path must be one of"):
        rnf_fast.choose_method(4, 1, path="gpu")


def test_auto_method_is_reported():
    dec = mlp_decoder(2, 4)
    _, info = rnf_fast.logdet_grad(dec, torch.randn(3, 2, dtype=torch.float64), return_info=True)
    assert info.method == "exact" and info.batching == "explicit"
