"""The closeness rule of the kernel tests: a kernel's error against a higher-precision truth
is at most twice that of the PyTorch reference run at the kernel's precision."""

from __future__ import annotations

import torch
from torch import Tensor

from rnf_fast.testing import rel_error


def assert_within_2x(
    name: str, got: Tensor, torch_run: Tensor, truth: Tensor, torch_truth: Tensor | None = None
) -> tuple[float, float]:
    """Check rel_error(got, truth) <= 2 · rel_error(torch_run, torch_truth).

    The bound never goes below the unit roundoff u = eps / 2 of ``got``'s dtype, the error of
    a correctly rounded result: a reference that happens to be exact (one rounding, or data
    that round exactly) cannot demand better than correct rounding.

    Arguments:
        name: what is compared, for the failure message.
        got: the kernel's result.
        torch_run: the reference's result at the kernel's precision.
        truth: the same quantity in higher precision (or exact).
        torch_truth: the truth for ``torch_run`` when it differs from ``truth``: a step of a
            recurrence is judged on its own inputs, each run's own earlier results.

    Returns:
        (kernel error, PyTorch error), relative in the Frobenius norm.
    """
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}"
    torch_truth = truth if torch_truth is None else torch_truth
    err_kernel = rel_error(got.double(), truth.double())
    err_torch = rel_error(torch_run.double(), torch_truth.double())
    unit_roundoff = torch.finfo(got.dtype).eps / 2
    bound = max(2 * err_torch, unit_roundoff)
    assert err_kernel <= bound, (
        f"{name}: kernel error {err_kernel:.3e} exceeds 2 x the PyTorch error {err_torch:.3e} "
        f"(bound {bound:.3e}) against the truth"
    )
    return err_kernel, err_torch
