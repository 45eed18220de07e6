"""The exact path against the float64 dense truth (value and gradients, params and z)."""

import pytest
import torch

import rnf_fast
from rnf_fast.testing import (
    NonVmappableDecoder,
    SinSoftplusDecoder,
    dense_logdet,
    grads,
    mlp_decoder,
    rel_error,
)

CASES = [
    ("mlp", lambda: mlp_decoder(3, 7, hidden=(9, 5)), 5, 3),
    ("mlp-relu-softplus", lambda: mlp_decoder(4, 11, hidden=(13,), activation="softplus"), 3, 4),
    ("sin-softplus", lambda: SinSoftplusDecoder(3, 4), 4, 3),
    ("d=1", lambda: mlp_decoder(1, 2, hidden=(6,)), 6, 1),
    ("D=d+1", lambda: mlp_decoder(5, 6, hidden=(7,)), 3, 5),
    ("awkward", lambda: SinSoftplusDecoder(7, 5), 2, 7),
]


def _truth(decoder, z):
    params = list(decoder.parameters())
    value = dense_logdet(decoder, z)
    return value.detach(), grads(value, [*params, z])


@pytest.mark.parametrize("name,make,B,d", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_exact_matches_dense_truth(name, make, B, d, chunk_size):
    decoder = make()
    z = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    value_true, grads_true = _truth(decoder, z)
    value = rnf_fast.logdet_grad(decoder, z, method="exact", chunk_size=chunk_size)
    got = grads(value, [*decoder.parameters(), z])
    assert rel_error(value.detach(), value_true) < 1e-8
    for i, (g, t) in enumerate(zip(got, grads_true)):
        if t.norm() > 0:
            assert rel_error(g, t) < 1e-8, f"gradient {i} of {name} off"
        else:
            assert g.norm() < 1e-12


def test_gradient_is_of_full_logdet_not_half():
    decoder = mlp_decoder(2, 5)
    z = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    (gz_true,) = grads(dense_logdet(decoder, z), [z])
    (gz,) = grads(rnf_fast.logdet_grad(decoder, z, method="exact"), [z])
    assert rel_error(gz, gz_true) < 1e-8
    assert rel_error(gz, 0.5 * gz_true) > 0.4


def test_plain_function_decoder_with_captured_parameters():
    W = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)

    def decoder(z):
        return torch.tanh(z @ W.T) + z.sum(1, keepdim=True)

    z = torch.randn(5, 3, dtype=torch.float64)
    (gW_true,) = grads(dense_logdet(decoder, z), [W])
    (gW,) = grads(rnf_fast.logdet_grad(decoder, z, method="exact"), [W])
    assert rel_error(gW, gW_true) < 1e-8


def test_float32_model_uses_float64_linalg():
    decoder = mlp_decoder(4, 9, dtype=torch.float32)
    z = torch.randn(3, 4)
    value, info = rnf_fast.logdet_grad(decoder, z, method="exact", return_info=True)
    assert value.dtype == torch.float32 and info.linalg_dtype == torch.float64
    truth = dense_logdet(decoder.double(), z.double())
    assert rel_error(value.double(), truth) < 1e-5


def test_non_vmappable_decoder_uses_repeat_fallback():
    decoder = NonVmappableDecoder(3, 8)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(decoder)(torch.randn(2, 4, 3, dtype=torch.float64))
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value_true, grads_true = _truth(decoder, z)
    value, info = rnf_fast.logdet_grad(decoder, z, method="exact", return_info=True)
    assert info.batching == "repeat" and "vmap" in info.fallback_reason
    assert rel_error(value.detach(), value_true) < 1e-8
    for g, t in zip(grads(value, [*decoder.parameters(), z]), grads_true):
        assert rel_error(g, t) < 1e-8 or t.norm() == 0


def test_repeat_batching_matches_vmap():
    decoder = SinSoftplusDecoder(3, 5)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    a = rnf_fast.logdet_grad(decoder, z, method="exact", batching="vmap")
    b = rnf_fast.logdet_grad(decoder, z, method="exact", batching="repeat")
    assert rel_error(b.detach(), a.detach()) < 1e-12
    for g, h in zip(grads(a, [z]), grads(b, [z])):
        assert rel_error(h, g) < 1e-12


def test_logdet_value_only_has_no_graph():
    decoder = mlp_decoder(3, 6)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    value = rnf_fast.logdet(decoder, z)
    assert not value.requires_grad
    assert rel_error(value, dense_logdet(decoder, z).detach()) < 1e-10


def test_under_torch_compile_gradients_equal_eager():
    decoder = mlp_decoder(3, 6)
    z = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def loss(z):
        return (z**2).sum() - 0.5 * rnf_fast.logdet_grad(decoder, z, method="exact").sum()

    (g_eager,) = torch.autograd.grad(loss(z), [z])
    compiled = torch.compile(loss, backend="eager")
    (g_comp,) = torch.autograd.grad(compiled(z), [z])
    assert rel_error(g_comp, g_eager) < 1e-12
