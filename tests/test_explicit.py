"""Explicit linearization of nn.Sequential MLPs against the generic torch.func path."""

import pytest
import torch
from torch import nn

import rnf_fast
from rnf_fast.flows import MLP
from rnf_fast.linearize.modules import (
    SequentialLinearization,
    activate,
    linearize_module,
    supports_sequential,
)
from rnf_fast.linearize.pieces import Dense
from rnf_fast.testing import dense_jacobian, dense_logdet, grads, rel_error

ACTIVATIONS = [
    nn.Tanh(),
    nn.Sigmoid(),
    nn.ReLU(),
    nn.LeakyReLU(0.2),
    nn.ELU(0.7),
    nn.Softplus(beta=2.0, threshold=3.0),
    nn.SiLU(),
    nn.GELU(),
]


def _seeded(layers, seed):
    """nn.Sequential of the layers in float64, Linear weights N(0, 1/fan-in), biases N(0, 0.01)."""
    g = torch.Generator().manual_seed(seed)
    for m in layers:
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return nn.Sequential(*layers).double()


def _mlp(act, d=3, D=8, seed=0):
    # Wide enough, with 1/sqrt(fan-in) weights, that J has full rank for every activation.
    return _seeded(
        [nn.Linear(d, 24), act, nn.Identity(), nn.Linear(24, 16), act, nn.Linear(16, D)], seed
    )


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_products_match_dense_jacobian(act):
    dec = _mlp(act)
    z = torch.randn(4, 3, dtype=torch.float64)
    lin = rnf_fast.linearize(dec, z)
    assert lin.batching == "explicit"
    J = dense_jacobian(dec, z)
    V = torch.randn(4, 2, 3, dtype=torch.float64)
    W = torch.randn(4, 2, 8, dtype=torch.float64)
    assert rel_error(lin.jvp(V), torch.einsum("bDd,bkd->bkD", J, V)) < 1e-12
    assert rel_error(lin.vjp(W), torch.einsum("bDd,bkD->bkd", J, W)) < 1e-12
    assert rel_error(lin.out, dec(z)) < 1e-14


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_logdet_grad_matches_dense_truth(act, method):
    dec = _mlp(act)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    inputs = [*dec.parameters(), z]
    truth = dense_logdet(dec, z)
    kw = (
        {
            "probes": 3**0.5 * torch.eye(3, dtype=torch.float64).expand(5, 3, 3),
            "tol": 0.0,
            "max_iter": 3,
        }
        if method == "cg"
        else {}
    )
    value, info = rnf_fast.logdet_grad(dec, z, method=method, return_info=True, **kw)
    assert info.batching == "explicit"
    assert rel_error(value.detach(), truth.detach()) < 1e-9
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-8 or t.norm() == 0


def test_forced_generic_path_agrees():
    dec = _mlp(nn.Tanh())
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    a, ia = rnf_fast.logdet_grad(dec, z, method="exact", return_info=True)
    b, ib = rnf_fast.logdet_grad(dec, z, method="exact", batching="vmap", return_info=True)
    assert (ia.batching, ib.batching) == ("explicit", "vmap")
    assert rel_error(a.detach(), b.detach()) < 1e-12
    assert rel_error(grads(a, [z])[0], grads(b, [z])[0]) < 1e-12


def test_unsupported_modules_take_the_generic_path():
    assert not supports_sequential(nn.Sequential(nn.Linear(2, 3), nn.GELU("tanh")))
    assert not supports_sequential(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
    assert not supports_sequential(nn.Sequential(nn.Tanh()))
    hooked = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 5))
    hooked[1].register_forward_hook(lambda m, i, o: o * 2)
    assert not supports_sequential(hooked)
    assert supports_sequential(nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 5)))
    _, info = rnf_fast.logdet_grad(
        hooked.double(), torch.randn(2, 2, dtype=torch.float64), return_info=True
    )
    assert info.batching == "vmap"


def _narrow_mlp(act, d=3, n=6, D=64, seed=1):
    """A decoder whose last Linear (n -> D) is much narrower than D: A = Mᵀ(WᵀW)M pays."""
    return _seeded([nn.Linear(d, 12), act, nn.Linear(12, n), act, nn.Linear(n, D)], seed)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.SiLU()], ids=lambda m: type(m).__name__)
def test_factored_gram_matches_dense_truth(act):
    dec = _narrow_mlp(act)
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    J = dense_jacobian(dec, z.detach())
    A = rnf_fast.linearize(dec, z).gram()
    assert A is not None
    assert rel_error(A, J.transpose(1, 2) @ J) < 1e-12
    inputs = [*dec.parameters(), z]
    truth = dense_logdet(dec, z)
    value, info = rnf_fast.logdet_grad(dec, z, method="exact", return_info=True)
    assert info.exact.gram == "factored"
    assert rel_error(value.detach(), truth.detach()) < 1e-10
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-9 or t.norm() == 0


def test_factored_gram_only_where_it_pays():
    # Last hidden width 16 against D = 8 (test _mlp): J is cheaper, the tangent path is used;
    # a trailing activation or a chunked call also keep it.
    z = torch.randn(4, 3, dtype=torch.float64)
    assert rnf_fast.linearize(_mlp(nn.Tanh()), z).gram() is None
    _, info = rnf_fast.logdet_grad(_mlp(nn.Tanh()), z, method="exact", return_info=True)
    assert info.exact.gram == "tangents"
    squashed = nn.Sequential(*_narrow_mlp(nn.Tanh()), nn.Sigmoid())
    assert rnf_fast.linearize(squashed, z).gram() is None
    _, info = rnf_fast.logdet_grad(
        _narrow_mlp(nn.Tanh()), z, method="exact", chunk_size=2, return_info=True
    )
    assert info.exact.gram == "tangents"


def test_cg_in_the_hidden_space_matches_dense_truth(monkeypatch):
    # A decoder ending in a narrow Linear runs CG's products as Mᵀ(WᵀW)(M v) and lifts M u
    # to J u once; the estimator must be unchanged.
    dec = _narrow_mlp(nn.Tanh())
    z = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(5, 2, 3, dtype=torch.float64)
    lin = rnf_fast.linearize(dec, z)
    H, AV = lin.gram_mv_hidden(V)
    JV, AV_direct = lin.gram_mv(V)
    assert rel_error(lin.lift(H), JV) < 1e-12
    assert rel_error(AV, AV_direct) < 1e-12
    calls = []
    original = type(lin).gram_mv_hidden
    monkeypatch.setattr(
        type(lin), "gram_mv_hidden", lambda self, V: calls.append(1) or original(self, V)
    )
    inputs = [*dec.parameters(), z]
    truth = dense_logdet(dec, z)
    probes = 3**0.5 * torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    value = rnf_fast.logdet_grad(dec, z, method="cg", probes=probes, tol=0.0, max_iter=3)
    assert calls, "the hidden-space products were not used"
    assert rel_error(value.detach(), truth.detach()) < 1e-9
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-8 or t.norm() == 0


def test_one_fused_rule_for_sequential_decoders_and_flow_conditioners():
    """An nn.Sequential decoder and the flows' MLP with the same weights go through the same
    rules: every Linear followed by its activation is one fused step, and the products agree
    bit for bit."""
    mlp = MLP(3, 8, hidden=(6, 5), activation="tanh").double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    linears = list(mlp.linears)
    seq = nn.Sequential(linears[0], nn.Tanh(), linears[1], nn.Tanh(), linears[2])
    z = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        y, chain = linearize_module(mlp, z)
    lin = rnf_fast.linearize(seq, z)
    assert isinstance(lin, SequentialLinearization)
    steps = [(type(part), part.scale is not None) for part in chain.parts]
    assert steps == [(Dense, True), (Dense, True), (Dense, False)]
    assert torch.equal(y, lin.out)
    V = torch.randn(4, 2, 3, dtype=torch.float64)
    assert torch.equal(chain.jvp(V), lin.jvp(V))
    C = torch.randn(4, 2, 8, dtype=torch.float64)
    assert torch.equal(chain.vjp(C), lin.vjp(C))


def test_activation_derivative_from_the_output_matches_autograd():
    a = torch.linspace(-4, 4, 41, dtype=torch.float64).reshape(1, -1)
    for act in ACTIVATIONS:
        y, slope = activate(act, a)
        assert torch.equal(y, act(a))
        want = torch.func.vmap(torch.func.grad(lambda t, act=act: act(t)))(a.flatten())
        assert rel_error(slope.flatten(), want) < 1e-14, type(act).__name__
    with pytest.raises(TypeError, match="m must be a supported activation"):
        activate(nn.Softsign(), a)
