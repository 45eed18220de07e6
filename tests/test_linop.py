"""The linear-operator seam: consistency of jvp, vjp and gram_mv with the dense Jacobian."""

import pytest
import torch

import rnf_fast
from rnf_fast.testing import NonVmappableDecoder, SinSoftplusDecoder, dense_jacobian, rel_error

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


def test_decoder_with_its_own_linearization_is_used():
    base = SinSoftplusDecoder(3, 4)

    class Own(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = base
            self.calls = 0

        def forward(self, z):
            return self.base(z)

        def linearize(self, z):
            self.calls += 1
            return rnf_fast.FuncLinearization(self.base, z, batching="vmap")

    own = Own()
    z = torch.randn(2, 3, dtype=torch.float64)
    a = rnf_fast.logdet(own, z)
    assert own.calls == 1
    assert rel_error(a, rnf_fast.logdet(base, z)) < 1e-14


def test_bad_own_linearization():
    class Bad(torch.nn.Module):
        def forward(self, z):
            return z.repeat(1, 2)

        def linearize(self, z):
            return "not a linearization"

    with pytest.raises(TypeError, match="decoder.linearize"):
        rnf_fast.logdet(Bad(), torch.randn(2, 3))
