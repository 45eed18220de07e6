"""Explicit per-layer linearizations against torch.func, in float64.

Every rule's J t and Jᵀ c must equal ``torch.func.jvp`` / ``vjp`` of the layer (both
directions), the differentiable J t (grad enabled) must have torch.func's gradients with respect
to the input and every parameter, and the torch.func fallback must serve layers without a rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

from rnf_fast.flows import (
    MLP,
    ActNorm,
    AffineCoupling,
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    Compose,
    ConvResNet,
    Flatten,
    Flow,
    Inverse,
    LULinear,
    Permutation,
    RationalQuadraticCoupling,
    Reverse,
    Squeeze,
    Unflatten,
    flat_flow,
    image_flow,
)
from rnf_fast.flows.preprocess import Logit
from rnf_fast.linearize.flows import coupling_cotangent, coupling_tangent, linearize_flow
from rnf_fast.linearize.generic import FuncLayer, func_fallbacks
from rnf_fast.linearize.modules import linearize_module
from rnf_fast.testing import NonVmappableDecoder

DTYPE = torch.float64
TOL = 1e-12  # relative, against torch.func in float64


def perturbed(module: nn.Module, *, std: float = 0.3, seed: int = 0) -> nn.Module:
    """The module in float64 with every parameter moved off its (often zero) initial value."""
    module = module.to(DTYPE)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return module


def randn(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def func_jvp(fn: Callable[[Tensor], Tensor], x: Tensor, T: Tensor) -> Tensor:
    return vmap(lambda t: jvp(fn, (x,), (t,))[1], in_dims=1, out_dims=1)(T)


def func_vjp(fn: Callable[[Tensor], Tensor], x: Tensor, C: Tensor) -> Tensor:
    _, pullback = vjp(fn, x)
    return vmap(lambda c: pullback(c)[0], in_dims=1, out_dims=1)(C)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-300))


def as_function(layer: Flow, inverse: bool) -> Callable[[Tensor], Tensor]:
    return (lambda v: layer.inverse(v)[0]) if inverse else (lambda v: layer(v)[0])


FLAT = 7  # features of the flat layers: odd, so the coupling halves differ (3 / 4)


def _flat_layers() -> dict[str, Callable[[], Flow]]:
    return {
        "affine": lambda: AffineCoupling(FLAT, hidden=(9, 5)),
        "affine-mask": lambda: AffineCoupling(
            FLAT, hidden=(6,), activation="silu", mask=[True, False, True, True, False, False, True]
        ),
        "spline": lambda: RationalQuadraticCoupling(FLAT, hidden=(9,), num_bins=5, bound=2.0),
        "actnorm": lambda: ActNorm(FLAT),
        "permutation": lambda: Permutation(FLAT),
        "reverse": lambda: Reverse(FLAT),
        "lu": lambda: LULinear(FLAT),
        "compose": lambda: flat_flow(FLAT, num_layers=2, hidden=(6,)),
        "inverse": lambda: Inverse(flat_flow(FLAT, num_layers=2, hidden=(6,), coupling="spline")),
    }


def _image_layers() -> dict[str, Callable[[], Flow]]:
    net = {"hidden_channels": 8, "num_blocks": 1}
    return {
        "checkerboard-0": lambda: CheckerboardAffineCoupling(3, parity=0, **net),
        "checkerboard-1": lambda: CheckerboardAffineCoupling(3, parity=1, norm=None, **net),
        "channel-0": lambda: ChannelAffineCoupling(3, parity=0, **net),
        "channel-1": lambda: ChannelAffineCoupling(3, parity=1, **net),
        "actnorm": lambda: ActNorm(3),
        "permutation": lambda: Permutation(3),
        "squeeze": lambda: Squeeze(3),
        "flatten": lambda: Flatten((3, 4, 6)),
    }


def _flat_case(name: str) -> tuple[Flow, Tensor]:
    layer = perturbed(_flat_layers()[name]())
    return layer, randn(5, FLAT)


def _image_case(name: str) -> tuple[Flow, Tensor]:
    layer = perturbed(_image_layers()[name]())
    return layer, randn(3, 3, 4, 6)


def _input_for(layer: Flow, x: Tensor, inverse: bool) -> Tensor:
    """A point in the domain of the map applied: the layer's output at x for the inverse."""
    if not inverse:
        return x
    with torch.no_grad():
        return layer(x)[0]


CASES = [("flat", n) for n in _flat_layers()] + [("image", n) for n in _image_layers()]


def _case(kind: str, name: str) -> tuple[Flow, Tensor]:
    return _flat_case(name) if kind == "flat" else _image_case(name)


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize(("kind", "name"), CASES, ids=[f"{k}-{n}" for k, n in CASES])
def test_layer_matches_torch_func(kind: str, name: str, inverse: bool) -> None:
    layer, x = _case(kind, name)
    x = _input_for(layer, x, inverse)
    fn = as_function(layer, inverse)
    with torch.no_grad():
        y, lin = linearize_flow(layer, x, inverse=inverse)
    assert func_fallbacks(lin) == []
    assert rel(y, fn(x)) < TOL
    T = randn(x.shape[0], 3, *x.shape[1:], seed=2)
    JT = lin.jvp(T)
    assert rel(JT, func_jvp(fn, x, T)) < TOL
    C = randn(*JT.shape, seed=3)
    assert rel(lin.vjp(C), func_vjp(fn, x, C)) < TOL


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_image_flow_and_logit(inverse: bool) -> None:
    flow = Compose(
        Logit(alpha=0.01),
        perturbed(
            image_flow((1, 4, 4), num_scales=2, blocks_per_scale=1, channels=4, num_res_blocks=1),
            std=0.05,
        ),
    )
    x = _input_for(
        flow, torch.rand(3, 16, generator=torch.Generator().manual_seed(4), dtype=DTYPE), inverse
    )
    fn = as_function(flow, inverse)
    with torch.no_grad():
        y, lin = linearize_flow(flow, x, inverse=inverse)
    assert func_fallbacks(lin) == []
    assert rel(y, fn(x)) < TOL
    T = randn(3, 2, 16, seed=5)
    assert rel(lin.jvp(T), func_jvp(fn, x, T)) < 1e-10
    assert rel(lin.vjp(T), func_vjp(fn, x, T)) < 1e-10


@pytest.mark.parametrize("name", ["compose", "inverse"])
def test_adjoint_identity(name: str) -> None:
    """⟨w, J v⟩ = ⟨Jᵀ w, v⟩ per sample and probe."""
    layer, x = _flat_case(name)
    with torch.no_grad():
        _, lin = linearize_flow(layer, x)
    V, W = randn(5, 4, FLAT, seed=6), randn(5, 4, FLAT, seed=7)
    left = (W * lin.jvp(V)).sum(-1)
    right = (lin.vjp(W) * V).sum(-1)
    assert rel(left, right) < TOL


def assert_grads_close(got: Sequence[Tensor], want: Sequence[Tensor]) -> None:
    """Each gradient within 1e-10 of the norm of all of them (some are exactly zero: a conv
    bias before a per-channel GroupNorm, a shift that does not enter J)."""
    scale = torch.cat([w.detach().flatten() for w in want]).norm()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert float((g - w).norm()) <= 1e-10 * float(scale), f"gradient {i}"


def _surrogate_grads(layer: Flow, x: Tensor, inner: Callable[[Tensor], Tensor]) -> list[Tensor]:
    x = x.clone().requires_grad_()
    value = inner(x)
    return torch.autograd.grad(
        value, [x, *layer.parameters()], allow_unused=True, materialize_grads=True
    )


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("flat", "compose"),
        ("flat", "spline"),
        ("flat", "inverse"),
        ("image", "checkerboard-0"),
        ("image", "channel-1"),
    ],
)
def test_differentiable_jvp_gradients(kind: str, name: str, inverse: bool) -> None:
    """With grad enabled the factors keep their graph: ∇⟨W, J T⟩ to x and every parameter equals
    torch.func's (second-order terms included)."""
    layer, x = _case(kind, name)
    x = _input_for(layer, x, inverse)
    fn = as_function(layer, inverse)
    T = randn(x.shape[0], 2, *x.shape[1:], seed=8)
    W = randn(*T.shape, seed=9)

    def explicit(v: Tensor) -> Tensor:
        return (W * linearize_flow(layer, v, inverse=inverse)[1].jvp(T)).sum()

    def generic(v: Tensor) -> Tensor:
        return (W * func_jvp(fn, v, T)).sum()

    assert_grads_close(_surrogate_grads(layer, x, explicit), _surrogate_grads(layer, x, generic))


def test_coupling_factorization_against_einsum() -> None:
    B, K, m, P = 3, 2, 5, 4
    dx, th = randn(B, K, m, seed=10), randn(B, K, m, P, seed=11)
    dy_dx, dy_dth = randn(B, m, seed=12), randn(B, m, P, seed=13)
    want = dy_dx[:, None] * dx + torch.einsum("bmp,bkmp->bkm", dy_dth, th)
    assert rel(coupling_tangent(dx, th, dy_dx, dy_dth), want) < TOL
    dy = randn(B, K, m, seed=14)
    cx, cth = coupling_cotangent(dy, dy_dx, dy_dth)
    # The cotangent step is the transpose of the tangent step.
    left = (dy * coupling_tangent(dx, th, dy_dx, dy_dth)).sum()
    assert rel(left, (cx * dx).sum() + (cth * th).sum()) < TOL


class _Sinh(Flow):
    """A layer with no explicit rule: y = x + 0.5 sinh(a x) per feature."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(n))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = x + 0.5 * torch.sinh(self.a * x)
        return y, torch.log1p(0.5 * self.a * torch.cosh(self.a * x)).sum(1)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("not needed by these tests")


class _NonVmappable(_Sinh):
    """y = x + 0.3 · mlp(x) through a custom autograd.Function without a vmap rule: vmap fails
    and the fallback repeats x along the batch instead."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.net = NonVmappableDecoder(n, n)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + 0.3 * self.net(x), x.new_zeros(x.shape[0])


def test_unknown_layer_falls_back_to_torch_func() -> None:
    flow = Compose(perturbed(AffineCoupling(FLAT, hidden=(5,))), perturbed(_Sinh(FLAT), std=0.2))
    x = randn(4, FLAT)
    fn = as_function(flow, False)
    with torch.no_grad():
        _, lin = linearize_flow(flow, x)
    assert func_fallbacks(lin) == ["_Sinh"]
    T = randn(4, 3, FLAT, seed=15)
    assert rel(lin.jvp(T), func_jvp(fn, x, T)) < TOL
    assert rel(lin.vjp(T), func_vjp(fn, x, T)) < TOL
    got = _surrogate_grads(flow, x, lambda v: (T * linearize_flow(flow, v)[1].jvp(T)).sum())
    want = _surrogate_grads(flow, x, lambda v: (T * func_jvp(fn, v, T)).sum())
    assert_grads_close(got, want)


def test_non_vmappable_layer_falls_back_to_repeat() -> None:
    layer = _NonVmappable(FLAT).to(DTYPE)
    x = randn(4, FLAT)
    with torch.no_grad():
        _, lin = linearize_flow(Compose(layer), x)
    T = randn(4, 3, FLAT, seed=20)
    fn = as_function(layer, False)
    # References one tangent at a time (vmap cannot batch this layer either).
    want_jvp = torch.stack([jvp(fn, (x,), (T[:, k],))[1] for k in range(3)], dim=1)
    _, pullback = vjp(fn, x)
    want_vjp = torch.stack([pullback(T[:, k])[0] for k in range(3)], dim=1)
    assert rel(lin.jvp(T), want_jvp) < TOL
    assert rel(lin.vjp(T), want_vjp) < TOL
    # The per-layer fallback is the decoder-level one: it switched to repeat and says why.
    piece = lin.parts[0]
    assert isinstance(piece, FuncLayer) and piece.batching == "repeat"
    assert piece.fallback_reason is not None and "vmap" in piece.fallback_reason


def test_module_rules_and_submodule_fallback() -> None:
    """Conditioner networks: ConvResNet (convs, GroupNorm, ReLU) explicitly; an activation
    without a rule (Softsign) falls back for that submodule only."""
    net = perturbed(ConvResNet(3, 4, hidden_channels=8, num_blocks=2), std=0.2)
    seq = perturbed(nn.Sequential(nn.Linear(FLAT, 6), nn.Softsign(), nn.Linear(6, 3), nn.GELU()))
    mlp = perturbed(MLP(FLAT, 4, hidden=(5, 6), activation="elu"))
    for module, x, fallbacks in (
        (net, randn(2, 3, 5, 6), []),
        (seq, randn(4, FLAT), ["Softsign"]),
        (mlp, randn(4, FLAT), []),
    ):
        with torch.no_grad():
            y, lin = linearize_module(module, x)
        assert func_fallbacks(lin) == fallbacks
        assert rel(y, module(x)) < TOL
        T = randn(x.shape[0], 2, *x.shape[1:], seed=16)
        assert rel(lin.jvp(T), func_jvp(module, x, T)) < TOL
        C = randn(*y.shape[:1], 2, *y.shape[1:], seed=17)
        assert rel(lin.vjp(C), func_vjp(module, x, C)) < TOL


def test_hooked_layer_is_not_linearized_explicitly() -> None:
    """A forward hook may change the output: the layer then goes through torch.func."""
    layer = perturbed(AffineCoupling(FLAT, hidden=(5,)))
    layer.register_forward_hook(lambda m, args, out: (2 * out[0], out[1]))
    x = randn(3, FLAT)
    with torch.no_grad():
        y, lin = linearize_flow(layer, x)
    assert func_fallbacks(lin) == ["AffineCoupling"]
    assert rel(y, layer(x)[0]) < TOL
    T = randn(3, 2, FLAT, seed=18)
    assert rel(lin.jvp(T), func_jvp(as_function(layer, False), x, T)) < TOL


def test_unflatten_round_trip() -> None:
    layer = Unflatten((2, 3, 2))
    x = randn(4, 12)
    with torch.no_grad():
        y, lin = linearize_flow(layer, x)
    T = randn(4, 3, 12, seed=19)
    assert torch.equal(lin.jvp(T), T.reshape(4, 3, 2, 3, 2))
    assert torch.equal(lin.vjp(lin.jvp(T)), T)


@pytest.mark.parametrize(
    "options",
    [
        {"padding": 1},
        {"padding": 0},
        {"padding": 2, "dilation": 2},
        {"padding": (1, 0), "kernel_size": (3, 1)},
        {"padding": 1, "groups": 2},
        {"padding": 1, "stride": 2},  # not a convolution at stride 1: nn.grad.conv2d_input
        {"padding": 3},  # padding above dilation·(k - 1): likewise
    ],
)
def test_convolution_transpose_is_the_vjp_of_the_convolution(options):
    # The transposed product of a Conv2d (a convolution with the flipped kernel at stride 1)
    # against autograd's vector-Jacobian product of the same convolution, in float64.
    from rnf_fast.linearize.modules import _Conv

    options = {"kernel_size": 3, **options}
    conv = torch.nn.Conv2d(4, 6, **options).double()
    B, K, size = 3, 2, (4, 9, 8)
    x = torch.randn(B * K, *size, dtype=torch.float64, requires_grad=True)
    out = conv(x)
    C = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, x, C)
    lin = _Conv(conv, size)
    assert lin.as_conv == (conv.stride == (1, 1) and options["padding"] != 3)
    got = lin.vjp(C.reshape(B, K, *C.shape[1:]))
    torch.testing.assert_close(got.reshape(expected.shape), expected, rtol=1e-12, atol=1e-12)
