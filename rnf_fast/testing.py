"""Shared helpers for tests and benchmarks: random decoders and the closeness rule."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "NonVmappableDecoder",
    "SinSoftplusDecoder",
    "grads",
    "mlp_decoder",
    "rel_error",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "gelu": nn.GELU}


def mlp_decoder(
    d: int,
    D: int,
    *,
    hidden: tuple[int, ...] = (16,),
    activation: str = "tanh",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> nn.Sequential:
    """A random MLP decoder R^d -> R^D (Linear, activation, ..., Linear), seeded.

    Arguments:
        d, D: input and output dimensions.
        hidden: hidden layer widths.
        activation: one of ``"tanh"``, ``"relu"``, ``"softplus"``, ``"gelu"``.
        dtype: parameter dtype.
        seed: initialisation seed.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    g = torch.Generator().manual_seed(seed)
    sizes = (d, *hidden, D)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class SinSoftplusDecoder(nn.Module):
    """A non-MLP decoder: x = [W z + sin(U z), softplus(V z) · (1 + z₀²)], D = 2·m."""

    def __init__(self, d: int, m: int, *, dtype: torch.dtype = torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(m, d, generator=g, dtype=dtype))
        self.U = nn.Parameter(0.5 * torch.randn(m, d, generator=g, dtype=dtype))
        self.V = nn.Parameter(torch.randn(m, d, generator=g, dtype=dtype))

    def forward(self, z: Tensor) -> Tensor:
        a = z @ self.W.T + torch.sin(z @ self.U.T)
        b = nn.functional.softplus(z @ self.V.T) * (1 + z[:, :1] ** 2)
        return torch.cat([a, b], dim=1)


class _CubicActivation(torch.autograd.Function):
    """x + x³/10 with hand-written backward and JVP and no vmap rule, like many custom ops."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x + 0.1 * x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (1 + 0.3 * x**2)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * (1 + 0.3 * x**2)


class NonVmappableDecoder(nn.Module):
    """An MLP decoder that ``torch.func.vmap`` cannot batch: its activation is a custom
    ``autograd.Function`` with a JVP but no vmap rule, as many hand-written ops are."""

    def __init__(self, d: int, D: int, *, dtype: torch.dtype = torch.float64, seed: int = 0):
        super().__init__()
        self.net = mlp_decoder(d, D, hidden=(12,), dtype=dtype, seed=seed)

    def forward(self, z: Tensor) -> Tensor:
        return self.net[2](_CubicActivation.apply(self.net[0](z)))


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual - expected‖ / ‖expected‖ (Frobenius), as a float."""
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def grads(value: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """Gradients of ``value.sum()`` with respect to ``inputs`` (zeros where unused)."""
    gs = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]
