"""The GroupNorm rule of rnf_fast.linearize.modules: the tangent (jvp), its transpose (vjp) and
the hand-written backward of the differentiable tangent (``_GroupNormTangent``), against the
plain formula the rule computed before (kept here as the reference, differentiated by autograd)
and, through the exact log det of a small image flow, against the torch.func dense truth."""

import contextlib
import copy

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck

import rnf_fast
from rnf_fast.flows import ConvResNet
from rnf_fast.linearize import modules
from rnf_fast.linearize.modules import MODULE_RULES, linearize_module
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import GroupNormTangentReference, dense_logdet, grads, rel_error

DTYPE = torch.float64


def reference_rule(gn: nn.GroupNorm, x: Tensor) -> tuple[Tensor, GroupNormTangentReference]:
    """The rule's formula as it was, autograd differentiating it."""
    return GroupNormTangentReference.at(gn, x)


def randn(*shape: int, seed: int, dtype: torch.dtype = DTYPE) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# (channels, groups, spatial, affine): a group per channel (the image flows' conditioners, 8
# channels in 8 groups), several channels per group, no / 1-d / 3-d spatial axes, no affine.
CASES = [
    (8, 8, (5, 6), True),
    (12, 4, (3, 5), True),
    (6, 2, (), True),
    (4, 2, (7,), True),
    (6, 3, (2, 3, 2), True),
    (6, 3, (4, 3), False),
]
IDS = [f"C{c}-G{g}-S{'x'.join(map(str, s)) or '0'}{'' if a else '-plain'}" for c, g, s, a in CASES]


def _layer(channels: int, groups: int, affine: bool, seed: int = 0) -> nn.GroupNorm:
    gn = nn.GroupNorm(groups, channels, affine=affine).to(DTYPE)
    if affine:
        with torch.no_grad():  # γ off 1 (some negative), β off 0
            gn.weight.copy_(randn(channels, seed=seed + 100))
            gn.bias.copy_(randn(channels, seed=seed + 101))
    return gn


def _inputs(channels: int, spatial: tuple[int, ...], K: int = 3, B: int = 2) -> tuple[Tensor, ...]:
    x = (2.0 * randn(B, channels, *spatial, seed=1) + 0.5).requires_grad_()
    T = randn(B, K, channels, *spatial, seed=2).requires_grad_()
    W = randn(B, K, channels, *spatial, seed=3)
    return x, T, W


@pytest.fixture
def applied(monkeypatch):
    """The tangents' shapes of every _GroupNormTangent.apply call (a spy): which path ran."""
    calls = []
    original = modules._GroupNormTangent.apply

    def spied(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(modules._GroupNormTangent, "apply", spied)
    return calls


@pytest.mark.parametrize("channels_per_group", [1, 3])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("wrt", ["all", "t", "factors"])
def test_tangent_function_gradcheck(channels_per_group, weight, wrt):
    """The written-out backward against finite differences: every input (x̂ and 1/σ free, as
    the Function sees them), and subsets (the backward skips what is not needed)."""
    B, K, G, c, S = 2, 3, 2, channels_per_group, 5
    t = randn(B, K, G, c, S, seed=0)
    xhat = randn(B, 1, G, c, S, seed=1)
    inv_std = 0.5 + randn(B, 1, G, 1, 1, seed=2).abs()
    gamma = randn(1, 1, G, c, 1, seed=3) if weight else None
    grad_of = {"all": (0, 1, 2, 3), "t": (0,), "factors": (1, 2, 3)}[wrt]
    inputs = [t, xhat, inv_std, gamma]
    for i in grad_of:
        if inputs[i] is not None:
            inputs[i].requires_grad_()
    assert gradcheck(modules._GroupNormTangent.apply, tuple(inputs), eps=1e-6, atol=1e-9)


def test_double_backward_is_refused():
    """The backward is first-order: a second derivative says so instead of a silent zero."""
    t = randn(2, 3, 2, 1, 4, seed=0).requires_grad_()
    xhat, inv_std = randn(2, 1, 2, 1, 4, seed=1), torch.ones(2, 1, 2, 1, 1, dtype=DTYPE)
    u = modules._GroupNormTangent.apply(t, xhat, inv_std, None)
    (g,) = torch.autograd.grad(u.pow(2).sum(), t, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


@pytest.mark.parametrize("graph", [False, True], ids=["no-grad", "graph"])
@pytest.mark.parametrize(("channels", "groups", "spatial", "affine"), CASES, ids=IDS)
def test_products_match_the_reference(channels, groups, spatial, affine, graph):
    """jvp and vjp equal the plain formula to float64 rounding, with and without a graph."""
    gn = _layer(channels, groups, affine)
    x, T, W = _inputs(channels, spatial)
    with torch.set_grad_enabled(graph):
        y, lin = linearize_module(gn, x)
        _, ref = reference_rule(gn, x)
        assert rel_error(y.detach(), gn(x).detach()) < 1e-14
        for _ in range(2):  # the second call reuses the factors formed by the first
            assert rel_error(lin.jvp(T).detach(), ref.jvp(T).detach()) < 1e-14
            assert rel_error(lin.vjp(W).detach(), ref.vjp(W).detach()) < 1e-14


@pytest.mark.parametrize("frozen", [False, True], ids=["trained-gamma", "frozen-gamma"])
@pytest.mark.parametrize(("channels", "groups", "spatial", "affine"), CASES, ids=IDS)
def test_graph_gradients_match_the_reference(channels, groups, spatial, affine, frozen, applied):
    """∇⟨W, J T⟩ and ∇⟨T, Jᵀ W⟩ with respect to T, x, γ and β through the written-out backward
    (jvp) and autograd (vjp) equal autograd through the plain formula."""
    gn = _layer(channels, groups, affine)
    if frozen and affine:
        gn.weight.requires_grad_(False)
    x, T, W = _inputs(channels, spatial)
    W.requires_grad_()
    wrt = [T, x, *(p for p in gn.parameters() if p.requires_grad)]
    got_jvp = grads((W * linearize_module(gn, x)[1].jvp(T)).sum(), wrt)
    want_jvp = grads((W * reference_rule(gn, x)[1].jvp(T)).sum(), wrt)
    assert len(applied) == 1
    got_vjp = grads((T * linearize_module(gn, x)[1].vjp(W)).sum(), [W, *wrt[1:]])
    want_vjp = grads((T * reference_rule(gn, x)[1].vjp(W)).sum(), [W, *wrt[1:]])
    for i, (g, w) in enumerate(zip(got_jvp + got_vjp, want_jvp + want_vjp, strict=True)):
        scale = max(float(w.norm()), 1.0)  # β's gradient is zero: compare on an absolute scale
        assert float((g - w).norm()) <= 1e-12 * scale, f"gradient {i}"


def test_no_graph_without_grad(applied):
    """Under torch.no_grad (CG's products), or with grad on but nothing requiring it, the rule
    records no graph and never enters the autograd Function."""
    gn = _layer(12, 4, True)
    x, T, W = _inputs(12, (3, 4))
    with torch.no_grad():
        _, lin = linearize_module(gn, x)
        outs = [lin.jvp(T), lin.vjp(W)]
    gn.requires_grad_(False)
    _, lin = linearize_module(gn, x.detach())
    outs += [lin.jvp(T.detach()), lin.vjp(W)]
    assert all(out.grad_fn is None and not out.requires_grad for out in outs)
    assert applied == []


def _image_flow(channels: int, seed: int = 0) -> RectangularFlow:
    """A two-scale image flow on 1×4×4 (d = 3) whose ConvResNet conditioners have GroupNorm
    (gcd(8, channels) groups), float64, every parameter perturbed off its initial value."""
    config = FlowConfig(
        D=16, d=3, image_shape=(1, 4, 4), image_blocks=1, image_channels=channels,
        image_res_blocks=1, h_layers=1, h_hidden=(8,), seed=seed,
    )  # fmt: skip
    model = RectangularFlow(config).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.f.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=DTYPE))
    return model


@pytest.mark.parametrize("chunk_size", [None, 1], ids=["one-chunk", "checkpointed"])
@pytest.mark.parametrize("channels", [4, 12], ids=["group-per-channel", "3-channels-per-group"])
def test_exact_logdet_gradient_of_an_image_flow(channels, chunk_size, applied):
    """The exact log det and its gradient (z and every parameter of f) through the explicit
    linearization equal the dense torch.func truth to 1e-10 relative."""
    model = _image_flow(channels)
    params = list(model.f.parameters())
    z = randn(4, 3, seed=7).requires_grad_()
    value = rnf_fast.logdet_grad(model.decoder, z, "exact", chunk_size=chunk_size)
    got = torch.cat([g.flatten() for g in grads(value, [z, *params])])
    assert applied, "the GroupNorm tangent's backward did not run"
    truth = dense_logdet(model.decode, z)
    want = torch.cat([g.flatten() for g in grads(truth, [z, *params])])
    assert rel_error(value.detach(), truth.detach()) < 1e-10
    assert rel_error(got, want) < 1e-10


# mode -> (dtype of the network and its input, autocast dtype or None)
MODES = {
    "float32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "bf16-autocast": (torch.float32, torch.bfloat16),
}


def _run(net: nn.Module, x: Tensor, T: Tensor, W: Tensor, autocast) -> list[Tensor]:
    """jvp, vjp and ∇⟨W, J T⟩ (x and the parameters, in one vector: some are exactly zero, the
    conv biases before a per-channel GroupNorm) of the network's linearization."""
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    x = x.detach().requires_grad_()
    with ctx:
        _, lin = linearize_module(net, x)
        with torch.no_grad():
            jvp, vjp = lin.jvp(T), lin.vjp(W)
        surrogate = (W.float() * lin.jvp(T).float()).sum()
    gradient = grads(surrogate, [x, *net.parameters()])
    return [jvp, vjp, torch.cat([g.double().flatten() for g in gradient]), *gradient]


@pytest.mark.parametrize("mode", list(MODES))
def test_low_precision_matches_the_reference(mode, monkeypatch):
    """A ConvResNet (GroupNorm with 1 and 2 channels per group) in bf16, in float32 and under
    bf16 autocast: every product and gradient comes in the dtype the plain formula gave, and
    its error against the float64 run is at most twice the plain formula's (plus 1e-7)."""
    dtype, autocast = MODES[mode]
    torch.manual_seed(0)
    for hidden in (8, 16):
        net = ConvResNet(3, 4, hidden_channels=hidden, num_blocks=1)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.2 * torch.randn_like(p))
        net = net.to(dtype)
        x = randn(3, 3, 5, 6, seed=4).to(dtype)
        T, W = randn(3, 2, 3, 5, 6, seed=5).to(dtype), randn(3, 2, 4, 5, 6, seed=6).to(dtype)
        # The truth: the network that ran (its rounded weights and inputs), in float64.
        truth = _run(copy.deepcopy(net).double(), x.double(), T.double(), W.double(), None)
        got = _run(net, x, T, W, autocast)
        monkeypatch.setitem(MODULE_RULES, nn.GroupNorm, reference_rule)
        ref = _run(net, x, T, W, autocast)
        monkeypatch.undo()
        for i, (g, r, t) in enumerate(zip(got, ref, truth, strict=True)):
            assert g.dtype == r.dtype, f"output {i}: {g.dtype} against {r.dtype}"
            if i > 2:
                continue  # the gradients' dtypes only; their errors together in output 2
            err, err_ref = rel_error(g.double(), t), rel_error(r.double(), t)
            assert err <= 2 * err_ref + 1e-7, f"output {i}: error {err:.2e} against {err_ref:.2e}"


LOW = [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("graph", [False, True], ids=["no-grad", "graph"])
@pytest.mark.parametrize("weight_dtype", LOW, ids=["gamma-bf16", "gamma-f32"])
@pytest.mark.parametrize("x_dtype", LOW, ids=["x-bf16", "x-f32"])
@pytest.mark.parametrize("t_dtype", LOW, ids=["t-bf16", "t-f32"])
def test_mixed_dtypes_promote_as_the_reference(t_dtype, x_dtype, weight_dtype, graph):
    """The layer's input, its tangents and γ in any mix of bf16 and float32 (autocast's convs
    give bf16 tangents and inputs, γ stays float32): the products, and the gradients of the
    differentiable tangent, come in the dtypes of the plain formula, near its values."""
    gn = _layer(12, 4, True).to(weight_dtype)
    x, T, W = _inputs(12, (3, 4))
    x, T = x.detach().to(x_dtype).requires_grad_(), T.detach().to(t_dtype).requires_grad_()
    with torch.set_grad_enabled(graph):
        lin, ref = linearize_module(gn, x)[1], reference_rule(gn, x)[1]
        got, want = [lin.jvp(T), lin.vjp(W.to(t_dtype))], [ref.jvp(T), ref.vjp(W.to(t_dtype))]
    if graph:
        wrt = [T, x, gn.weight]
        got += grads((W * got[0]).sum(), wrt)
        want += grads((W * want[0]).sum(), wrt)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, f"output {i}: {g.dtype} against {w.dtype}"
        assert rel_error(g.detach().double(), w.detach().double()) < 0.05, f"output {i}"
