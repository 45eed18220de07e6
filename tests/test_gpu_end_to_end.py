"""``logdet_grad`` end to end on a CUDA device, against the float64 dense truth, on every
backend the device has (marked ``cuda``: bench/gpu_check.sh runs these).

The rule is the kernels' closeness rule (rnf_fast.testing.assert_within_2x): on the same
float32 problem, a backend's error in the value and in the gradient (decoder parameters and z)
against the float64 truth is at most twice that of the plain PyTorch backend. TF32 is off
(tests/conftest.py), so the PyTorch run is IEEE float32. CG runs with the full probe set
V = √d I (deterministic, unbiased) at the float32 CG tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import rnf_fast
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import CG_FLOAT32_TOL, assert_within_2x, dense_logdet, grads, mlp_decoder

# (name, batch): the standard MLP, a tabular rectangular flow and a convolutional one, at the
# sizes of the benchmarks' problems of the same names (bench/harness/problems.py).
PROBLEMS = [("mlp-16-784", 64), ("flow-miniboone", 16), ("quick-image", 8)]
FLOWS = {
    "flow-miniboone": {
        "D": 43, "d": 21, "f_layers": 10, "f_hidden": (128,) * 4, "f_coupling": "affine",
    },
    "quick-image": {
        "D": 16, "d": 3, "image_shape": (1, 4, 4), "image_blocks": 1, "image_channels": 4,
    },
}  # fmt: skip


class Problem:
    """A float32 decoder on the device with its parameters and z (B, d), and the float64 dense
    truth of log det(JᵀJ) (B,) and of its gradients over ``[*params, z]``, on the CPU."""

    def __init__(self, name: str, batch: int, device: str, seed: int = 0) -> None:
        if name == "mlp-16-784":
            net64: nn.Module = mlp_decoder(16, 784, hidden=(256, 256), seed=seed)
            d = 16
        else:
            cfg = FLOWS[name]
            net64 = RectangularFlow(FlowConfig(h_layers=1, h_hidden=(8,), seed=seed, **cfg))
            net64 = net64.double().eval()
            # The zero-initialised layers perturbed (N(0, 0.05²), seeded): the flow is then
            # neither the identity nor an isometry.
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in net64.f.parameters():
                    if p.numel() and bool((p == 0).all()):
                        p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            d = cfg["d"]
        g = torch.Generator().manual_seed(seed + 1)
        z64 = torch.randn(batch, d, generator=g, dtype=torch.float64, requires_grad=True)
        decoder64, params64 = self._parts(net64)
        value = dense_logdet(decoder64, z64)
        self.truth_value = value.detach()
        self.truth_grads = grads(value, [*params64, z64])
        net = copy.deepcopy(net64).float().to(device)
        self.decoder, self.params = self._parts(net)
        self.z = z64.detach().float().to(device)

    @staticmethod
    def _parts(net: nn.Module) -> tuple[nn.Module, list[Tensor]]:
        """The decoder to differentiate (a flow's ``decoder``, with its explicit linearization,
        else ``decode``) and the parameters the gradient is checked on."""
        if isinstance(net, RectangularFlow):
            decoder = getattr(net, "decoder", None)
            return (decoder if decoder is not None else net.decode), list(net.f.parameters())
        return net, list(net.parameters())


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
    problem = Problem(name, batch, "cuda")
    truth_value, truth_grads = problem.truth_value, problem.truth_grads
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
