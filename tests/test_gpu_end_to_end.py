"""``logdet_grad`` end to end on a CUDA device, against the float64 dense truth, on every
backend the device has (marked ``cuda``: bench/gpu_check.sh runs these).

The rule is the kernels' closeness rule (rnf_fast.testing.assert_within_2x): on the same
float32 problem, a backend's error in the value and in the gradient (decoder parameters and z)
against the float64 truth is at most twice that of the plain PyTorch backend. TF32 is off
(tests/conftest.py), so the PyTorch run is IEEE float32. CG runs with the full probe set
V = √d I (deterministic, unbiased) at the float32 CG tolerance.
"""

from __future__ import annotations

import pytest
import torch

import rnf_fast
from rnf_fast.benchmarks import make_problem
from rnf_fast.testing import CG_FLOAT32_TOL, assert_within_2x, grads

# (problem, batch): the standard MLP, a tabular rectangular flow and a convolutional one.
PROBLEMS = [("mlp-16-784", 64), ("flow-miniboone", 16), ("quick-image", 8)]


def _run(problem, method: str, backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    z = problem.z.detach().clone().requires_grad_(True)
    B, d = z.shape
    if method == "cg":
        probes = d**0.5 * torch.eye(d, device=z.device).expand(B, d, d)
        kw = {"probes": probes, "tol": CG_FLOAT32_TOL, "max_iter": 3 * d}
    else:
        kw = {}
    value, info = rnf_fast.logdet_grad(
        problem.decoder, z, method=method, backend=backend, return_info=True, **kw
    )
    assert info.backend == backend
    return value.detach().cpu(), [g.cpu() for g in grads(value, [*problem.params, z])]


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.parametrize("name, batch", PROBLEMS)
def test_logdet_grad_on_cuda_matches_the_float64_truth(name, batch, method):
    problem = make_problem(name, batch=batch, device="cuda")
    truth_value, truth_grads = problem.truth_value.cpu(), [g.cpu() for g in problem.truth_grads]
    backends = rnf_fast.available_backends("cuda")
    assert "torch" in backends
    runs = {b: _run(problem, method, b) for b in backends}
    torch_value, torch_grads = runs["torch"]
    for backend, (value, gs) in runs.items():
        label = f"{name} {method} ({backend})"
        assert_within_2x(f"{label} value", value, torch_value, truth_value)
        assert_within_2x(
            f"{label} gradient",
            torch.cat([g.flatten() for g in gs]),
            torch.cat([g.flatten() for g in torch_grads]),
            torch.cat([g.flatten() for g in truth_grads]),
        )
