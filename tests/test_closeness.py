"""The comparison rules of rnf_fast.testing that every kernel and GPU check relies on: they pass
a correct backend and fail a wrong one."""

from __future__ import annotations

import pytest
import torch

from rnf_fast.ops import cpp as cpp_backend
from rnf_fast.ops import reference
from rnf_fast.testing import CG_FLOAT32_TOL, assert_within_2x, cg_agreement


def _systems(N, d, dtype):
    G = torch.randn(N, d, d, dtype=torch.float64)
    A = G @ G.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)
    return A.to(dtype), torch.randn(N, d, dtype=torch.float64).to(dtype)


def _biased_update(state, Ap, tol):
    """A wrong CG step: the curvature pᵀAp over-estimated by 1%."""
    return reference.cg_update(state, 1.01 * Ap, tol)


def test_within_2x_passes_a_correct_rounding_and_fails_a_larger_error():
    truth = torch.randn(1000, dtype=torch.float64)
    torch_run = truth.float()
    assert_within_2x("rounded", torch_run.clone(), torch_run, truth)
    worse = torch_run * (1 + 4 * torch.finfo(torch.float32).eps)
    with pytest.raises(AssertionError, match="exceeds 2 x the PyTorch error"):
        assert_within_2x("scaled", worse, torch_run, truth)
    with pytest.raises(AssertionError, match="shape"):
        assert_within_2x("shape", torch_run[:5], torch_run[:5], truth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_agreement_accepts_the_compiled_backend(dtype):
    # The C++ kernel rounds differently from the reference; at tol 1e-5 in float32 the two
    # stopped 92 of 1,024 such systems at different steps. The rule holds at its tolerances.
    if cpp_backend._C is None:
        pytest.skip(cpp_backend.unavailable_reason())
    A, b = _systems(1024, 16, dtype)
    report = cg_agreement(cpp_backend.cg_update, A, b)
    assert report["iterations"] > 3  # the systems take several steps: the rule is exercised
    assert report["max_step_gap"] <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cg_agreement_rejects_a_wrong_update(dtype):
    A, b = _systems(256, 8, dtype)
    with pytest.raises(AssertionError, match="cg x: kernel error .* exceeds 2 x"):
        cg_agreement(_biased_update, A, b)


def test_cg_agreement_requires_equal_steps_in_float64():
    def early_stop(state, Ap, tol):  # a looser stopping rule: some systems stop earlier
        return reference.cg_update(state, Ap, 10 * tol)

    A, b = _systems(256, 8, torch.float64)
    with pytest.raises(
        AssertionError, match=r"float64 step counts differ from the reference on \d+ of 256"
    ):
        cg_agreement(early_stop, A, b)


def test_cg_agreement_refuses_float32_below_its_tolerance():
    A, b = _systems(4, 3, torch.float32)
    with pytest.raises(ValueError, match="tol must be >= 0.001"):
        cg_agreement(reference.cg_update, A, b, tol=CG_FLOAT32_TOL / 100)
