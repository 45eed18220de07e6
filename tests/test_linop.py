"""The linear-operator seam: consistency of jvp, vjp and gram_mv with the dense Jacobian."""

import pytest
import torch

import rnf_fast
from rnf_fast.flows import Flow
from rnf_fast.linearize import PaddedFlowLinearization, SequentialLinearization
from rnf_fast.linearize.flows import pad
from rnf_fast.testing import (
    NonVmappableDecoder,
    SinSoftplusDecoder,
    dense_jacobian,
    dense_logdet,
    grads,
    rel_error,
)

CASES = [
    ("sin-softplus, vmap", lambda: SinSoftplusDecoder(4, 5), "vmap"),
    ("sin-softplus, repeat", lambda: SinSoftplusDecoder(4, 5), "repeat"),
    ("custom op, auto -> repeat", lambda: NonVmappableDecoder(4, 9), "auto"),
]


@pytest.mark.parametrize("name,make,batching", CASES, ids=[c[0] for c in CASES])
def test_products_match_dense_jacobian(name, make, batching):
    decoder = make()
    z = torch.randn(3, 4, dtype=torch.float64)
    lin = rnf_fast.linearize(decoder, z, batching=batching)
    J = dense_jacobian(decoder, z)
    V = torch.randn(3, 2, 4, dtype=torch.float64)
    W = torch.randn(3, 2, J.shape[1], dtype=torch.float64)
    JV = lin.jvp(V)
    assert rel_error(JV, torch.einsum("bDd,bkd->bkD", J, V)) < 1e-12
    assert rel_error(lin.vjp(W), torch.einsum("bDd,bkD->bkd", J, W)) < 1e-12
    JV2, AV = lin.gram_mv(V)
    assert rel_error(AV, torch.einsum("bDd,bDe,bke->bkd", J, J, V)) < 1e-12
    # ⟨w, J v⟩ = ⟨Jᵀ w, v⟩
    lhs = (W * JV).sum(-1)
    rhs = (lin.vjp(W) * V).sum(-1)
    assert rel_error(lhs, rhs) < 1e-12
    assert rel_error(lin.out, decoder(z)) < 1e-14


def test_jvp_with_graph_passes_gradients_to_z():
    decoder = SinSoftplusDecoder(3, 4)
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 1, 3, dtype=torch.float64)
    lin = rnf_fast.linearize(decoder, z)
    (g,) = torch.autograd.grad(lin.jvp(V, create_graph=True).sum(), [z])
    ref = torch.func.jvp(decoder, (z,), (V[:, 0],))[1]
    (g_ref,) = torch.autograd.grad(ref.sum(), [z])
    assert rel_error(g, g_ref) < 1e-12
    assert not lin.jvp(V).requires_grad


class _TanhDecoder(torch.nn.Module):
    """x = tanh(z Wᵀ + b), (B, d) -> (B, D), in float64."""

    def __init__(self, d: int, D: int, *, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(
            torch.randn(D, d, generator=generator, dtype=torch.float64) / d**0.5
        )
        self.bias = torch.nn.Parameter(
            0.1 * torch.randn(D, generator=generator, dtype=torch.float64)
        )

    def forward(self, z):
        return torch.tanh(z @ self.weight.T + self.bias)


class _TanhLinearization(rnf_fast.Linearization):
    """A hand-written explicit linearization with only jvp and vjp: J = diag(1 - x²) W."""

    path = "explicit"
    batching = "own"

    def __init__(self, decoder: _TanhDecoder, z):
        self.decoder, self.z = decoder, z
        with torch.no_grad():
            self.out = decoder(z.detach())
        self.calls = {"jvp": 0, "vjp": 0}

    def _slope(self, z):
        return 1 - self.decoder(z) ** 2

    def jvp(self, V, *, create_graph=False):
        self.calls["jvp"] += 1
        with torch.set_grad_enabled(create_graph):
            z = self.z if create_graph else self.z.detach()
            return (V @ self.decoder.weight.T) * self._slope(z).unsqueeze(1)

    def vjp(self, C):
        self.calls["vjp"] += 1
        with torch.no_grad():
            return (C * self._slope(self.z.detach()).unsqueeze(1)) @ self.decoder.weight


class _Own(torch.nn.Module):
    """A decoder that supplies its own linearization and counts the calls."""

    def __init__(self, base: _TanhDecoder):
        super().__init__()
        self.base = base
        self.calls = 0
        self.lins: list[_TanhLinearization] = []

    def forward(self, z):
        return self.base(z)

    def linearize(self, z):
        self.calls += 1
        self.lins.append(_TanhLinearization(self.base, z))
        return self.lins[-1]


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_decoder_with_its_own_linearization_is_used(method):
    """The decoder's own linearization is called once, its products are the ones used, and the
    result is the dense float64 truth (a wrong or ignored own linearization fails here)."""
    base = _TanhDecoder(3, 7)
    own = _Own(base)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    options = {}
    if method == "cg":  # V = √d I: the CG estimator is exact after d iterations
        options = {"probes": 3**0.5 * torch.eye(3, dtype=torch.float64).expand(4, 3, 3)}
        options |= {"tol": 0.0, "max_iter": 3}
    value, info = rnf_fast.logdet_grad(own, z, method=method, return_info=True, **options)
    assert own.calls == 1
    assert info.batching == "own"
    assert own.lins[0].calls["jvp"] >= 1
    if method == "cg":
        assert own.lins[0].calls["vjp"] >= 1  # gram_mv, inherited from the base class
    truth = dense_logdet(base, z)
    assert rel_error(value.detach(), truth.detach()) < 1e-10
    inputs = [*base.parameters(), z]
    for g, t in zip(grads(value, inputs), grads(truth, inputs)):
        assert rel_error(g, t) < 1e-9


def test_declared_path_is_what_the_auto_rule_sees():
    """A decoder's own linearization declaring path = "explicit" is costed as explicit; the same
    decoder without it takes the generic path. d is the first where the two rules differ."""
    choices = {
        d: (rnf_fast.choose_method(d, 1, path="explicit"), rnf_fast.choose_method(d, 1))
        for d in (4, 8, 16, 32, 64)
    }
    d = next(d for d, (explicit, generic) in choices.items() if explicit != generic)
    base = _TanhDecoder(d, d + 4)
    z = torch.randn(3, d, dtype=torch.float64)
    _, own_info = rnf_fast.logdet_grad(_Own(base), z, return_info=True)
    _, generic_info = rnf_fast.logdet_grad(base, z, return_info=True)
    assert own_info.method == rnf_fast.choose_method(d, 1, path="explicit")
    assert generic_info.method == rnf_fast.choose_method(d, 1, path="generic")


def test_base_class_gives_gram_mv_and_declares_capabilities():
    base = _TanhDecoder(3, 5)
    z = torch.randn(2, 3, dtype=torch.float64)
    lin = _TanhLinearization(base, z)
    assert "gram_mv" not in vars(_TanhLinearization)
    assert isinstance(lin, rnf_fast.Linearization)
    for name in ("gram", "gram_mv_hidden", "lift", "fallback_reason"):
        assert getattr(lin, name) is None, name
    assert (lin.path, lin.batching) == ("explicit", "own")
    V = torch.randn(2, 4, 3, dtype=torch.float64)
    J = dense_jacobian(base, z)
    JV, AV = lin.gram_mv(V)
    assert rel_error(JV, torch.einsum("bDd,bkd->bkD", J, V)) < 1e-12
    assert rel_error(AV, torch.einsum("bDd,bDe,bke->bkd", J, J, V)) < 1e-12


def test_base_class_defaults_and_checks():
    class Minimal(rnf_fast.Linearization):
        def jvp(self, V, *, create_graph=False):
            return V

        def vjp(self, C):
            return C

    # Undeclared: costed as generic, reported under the class name.
    assert (Minimal.path, Minimal.batching) == ("generic", "Minimal")
    assert rnf_fast.FuncLinearization.path == "generic"
    assert SequentialLinearization.path == PaddedFlowLinearization.path == "explicit"
    with pytest.raises(TypeError, match="abstract"):

        class NoVjp(rnf_fast.Linearization):
            def jvp(self, V, *, create_graph=False):
                return V

        NoVjp()
    with pytest.raises(TypeError, match="path must be 'explicit' or 'generic'"):

        class Typo(Minimal):
            path = "Explicit"


def test_duck_typed_own_linearization_still_serves():
    """An object with z, out, jvp, vjp and gram_mv that does not subclass Linearization."""
    base = _TanhDecoder(3, 6)
    z = torch.randn(3, 3, dtype=torch.float64)

    class Duck:
        def __init__(self, z):
            self.inner = rnf_fast.FuncLinearization(base, z, batching="vmap")
            self.z, self.out = z, self.inner.out

        def jvp(self, V, *, create_graph=False):
            return self.inner.jvp(V, create_graph=create_graph)

        def vjp(self, C):
            return self.inner.vjp(C)

        def gram_mv(self, V):
            return self.inner.gram_mv(V)

    class Decoder(torch.nn.Module):
        def forward(self, z):
            return base(z)

        def linearize(self, z):
            return Duck(z)

    assert isinstance(Duck(z), rnf_fast.Linearization)
    value = rnf_fast.logdet(Decoder(), z, method="exact")
    assert rel_error(value, dense_logdet(base, z)) < 1e-10


def test_fallback_records_why_for_a_decoder_and_for_a_flow_layer():
    """The one torch.func fallback switches to repeat and records vmap's error, whether it
    linearizes a whole decoder or one flow layer without a rule."""
    decoder = NonVmappableDecoder(3, 7)
    z = torch.randn(2, 3, dtype=torch.float64)
    lin = rnf_fast.linearize(decoder, z)
    assert isinstance(lin, rnf_fast.FuncLinearization) and lin.fallback_reason is None
    lin.gram_mv(torch.randn(2, 2, 3, dtype=torch.float64))
    assert lin.batching == "repeat" and "vmap" in lin.fallback_reason

    class Layer(Flow):
        def __init__(self):
            super().__init__()
            self.net = NonVmappableDecoder(4, 4)

        def forward(self, x):
            return x + 0.3 * self.net(x), x.new_zeros(x.shape[0])

        def inverse(self, y):
            raise NotImplementedError

    layer = Layer()
    flat = PaddedFlowLinearization(z, flows=(layer,), D=4)
    assert flat.path == "generic" and flat.batching == "explicit+func"
    assert flat.fallback_reason == "no explicit rule for Layer: torch.func used there"
    V = torch.randn(2, 2, 3, dtype=torch.float64)
    _, AV = flat.gram_mv(V)
    assert flat.fallback_reason.startswith("no explicit rule for Layer: torch.func used there; ")
    assert "vmap failed, rows repeated: Layer (RuntimeError: " in flat.fallback_reason
    J = dense_jacobian(lambda v: layer(pad(v, 4))[0], z)
    assert rel_error(AV, torch.einsum("bDd,bDe,bke->bkd", J, J, V)) < 1e-12


def test_bad_own_linearization():
    class Bad(torch.nn.Module):
        def forward(self, z):
            return z.repeat(1, 2)

        def linearize(self, z):
            return "not a linearization"

    with pytest.raises(TypeError, match="decoder.linearize"):
        rnf_fast.logdet(Bad(), torch.randn(2, 3))
