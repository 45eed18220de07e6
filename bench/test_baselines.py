"""The competitors of the benchmarks (harness.baselines): the official code's algorithm and the
free-form (FIF) surrogate against the float64 dense truth."""

import pytest
import torch
from harness.baselines import logdet_fif, logdet_official_cg
from harness.problems import pseudo_inverse_encoder

from rnf_fast.testing import SinSoftplusDecoder, dense_logdet, grads, mlp_decoder, rel_error


def _problem(seed=0, B=5, d=3, D=10):
    decoder = mlp_decoder(d, D, hidden=(8, 8), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(B, d, generator=g, dtype=torch.float64, requires_grad=True)
    inputs = [*decoder.parameters(), z]
    truth = grads(dense_logdet(decoder, z), inputs)
    return decoder, z, inputs, torch.cat([t.flatten() for t in truth])


def _flat(value, inputs):
    return torch.cat([t.flatten() for t in grads(value, inputs)])


def _unit_probes(B, d):
    return (d**0.5) * torch.eye(d, dtype=torch.float64).expand(B, d, d)


def test_official_converged_matches_exact_gradient():
    decoder, z, inputs, truth = _problem()
    B, d = z.shape
    out = logdet_official_cg(decoder, z, probes=_unit_probes(B, d), tol=1e-12, min_iter=d)
    assert torch.equal(out.detach(), torch.zeros(B, dtype=torch.float64))
    assert rel_error(_flat(out, inputs), truth) < 1e-10


def test_official_default_rule_runs_min_11_iterations_capped_at_d():
    decoder, z, _, _ = _problem(d=3)
    _, info = logdet_official_cg(decoder, z, probes=2, return_info=True)
    assert info == {"matvecs": 3, "cg_iterations": 3}  # min(11, d) with tol 1
    decoder, z, _, _ = _problem(d=14, D=20)
    _, info = logdet_official_cg(decoder, z, return_info=True)
    assert 11 <= info["cg_iterations"] <= 14


def test_official_is_unbiased_in_the_mean():
    """Gaussian probes, CG to convergence: the mean of 200 single-probe gradients is within
    4 standard errors of the exact gradient in every coordinate of z."""
    decoder, z, _, _ = _problem(B=2, d=2, D=6)
    truth = grads(dense_logdet(decoder, z), [z])[0]
    g = torch.Generator().manual_seed(3)
    draws = torch.stack(
        [grads(logdet_official_cg(decoder, z, tol=1e-12, generator=g), [z])[0] for _ in range(200)]
    )
    se = draws.std(0) / 200**0.5
    assert ((draws.mean(0) - truth).abs() <= 4 * se + 1e-12).all()


def test_fif_with_pseudo_inverse_is_exact_with_unit_probes():
    decoder, z, inputs, truth = _problem()
    B, d = z.shape
    encoder = pseudo_inverse_encoder(decoder, z)
    out = logdet_fif(decoder, encoder, z, probes=_unit_probes(B, d))
    assert rel_error(_flat(out, inputs), truth) < 1e-10


def test_fif_with_pseudo_inverse_is_unbiased():
    """Random Rademacher probes, K = 2: the mean over 300 draws matches the exact gradient
    within 4 standard errors (per coordinate of z) on a non-MLP decoder."""
    decoder = SinSoftplusDecoder(2, 4, seed=1)
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    z.requires_grad_(True)
    truth = grads(dense_logdet(decoder, z), [z])[0]
    encoder = pseudo_inverse_encoder(decoder, z)
    g = torch.Generator().manual_seed(4)
    draws = []
    for _ in range(300):
        V = torch.randint(0, 2, (3, 2, 2), generator=g, dtype=torch.float64) * 2 - 1
        draws.append(grads(logdet_fif(decoder, encoder, z, probes=V), [z])[0])
    draws = torch.stack(draws)
    se = draws.std(0) / 300**0.5
    assert ((draws.mean(0) - truth).abs() <= 4 * se + 1e-12).all()


def test_fif_with_another_left_inverse_is_biased():
    """A left inverse that is not the pseudo-inverse (E J = I, E ≠ J⁺) gives the gradient
    2 tr(E ∂J), not that of log det(JᵀJ)."""
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    W.requires_grad_(True)
    z = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    decoder = lambda z: z @ W.T  # noqa: E731
    E = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]], dtype=torch.float64)  # E W = I
    out = logdet_fif(decoder, lambda x: x @ E.T, z, probes=_unit_probes(1, 2))
    (gW,) = torch.autograd.grad(out.sum(), W)
    assert torch.allclose(gW, 2 * E.T)
    exact = 2 * torch.linalg.pinv(W.detach()).T
    assert not torch.allclose(gW, exact, atol=1e-3)


@pytest.mark.parametrize("fn", ["official", "fif"])
def test_bad_probes_name_the_argument(fn):
    decoder, z, _, _ = _problem()
    call = (
        (lambda p: logdet_official_cg(decoder, z, probes=p))
        if fn == "official"
        else (lambda p: logdet_fif(decoder, lambda x: x[:, :3], z, probes=p))
    )
    with pytest.raises(ValueError, match="probes"):
        call(0)
    with pytest.raises(ValueError, match="probes"):
        call(torch.ones(5, 2, 4, dtype=torch.float64))
