"""The competitors of the benchmarks (harness.baselines): the official code's algorithm and the
free-form (FIF) surrogate against the float64 dense truth; the official code's primal+tangent
pass against ``torch.func.jvp``."""

import pytest
import torch
from harness import baselines
from harness.baselines import logdet_fif, logdet_official_cg, tangent_pass
from harness.problems import make_problem, pseudo_inverse_encoder
from torch import nn

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


DECODERS = (
    "mlp-tanh",
    "mlp-relu",
    "mlp-softplus",
    "mlp-gelu",
    "softplus-threshold",
    "sin-softplus",
    "mlp-sigmoid",
    "flow",
    "conv-flow",
)


def _decoder(name):
    """A float64 decoder of a kind the official contender meets, its d, and the tangent pass
    it must get: hand-written layers for the MLPs of supported activations (one a Softplus with
    entries on both sides of its threshold), forward-mode dual tensors for the rest (a non-MLP
    module, an MLP whose activation has no hand-written rule, a coupling and a conv flow)."""
    if name.startswith("mlp-") and name != "mlp-sigmoid":
        decoder = mlp_decoder(3, 10, hidden=(16, 16), activation=name[4:], seed=1)
        return decoder, 3, "hand-written"
    if name == "softplus-threshold":
        decoder = nn.Sequential(nn.Linear(3, 10, dtype=torch.float64), nn.Softplus(2.0, 1.0))
        with torch.no_grad():
            decoder[0].weight.mul_(4)  # pre-activations of about ±4: β a crosses 1 both ways
        return decoder, 3, "hand-written"
    if name == "sin-softplus":
        return SinSoftplusDecoder(3, 5, seed=1), 3, "forward_ad"
    if name == "mlp-sigmoid":
        return nn.Sequential(nn.Linear(3, 10, dtype=torch.float64), nn.Sigmoid()), 3, "forward_ad"
    problem = make_problem("quick-flow" if name == "flow" else "quick-image", truth=False)
    return problem.model.double().decoder, problem.spec.d, "forward_ad"


def _functorch_pass(decoder):
    """The reference primal+tangent pass: ``torch.func.jvp``, what the contender used before
    it pushed tangents the official code's way."""
    return lambda z, t: torch.func.jvp(decoder, (z,), (t,))


@pytest.mark.parametrize("name", DECODERS)
def test_tangent_pass_matches_func_jvp_and_takes_its_route(name, monkeypatch):
    """Primal and J t equal ``torch.func.jvp``'s to float64 rounding, and the pass is the one
    the docstring promises (forward-mode dual tensors only where no hand-written rule exists)."""
    decoder, d, route = _decoder(name)
    routes = []
    real = baselines._forward_ad_pass
    monkeypatch.setattr(baselines, "_forward_ad_pass", lambda f: routes.append(f) or real(f))
    push = tangent_pass(decoder)
    assert (routes == [decoder]) == (route == "forward_ad"), routes
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, d, generator=g, dtype=torch.float64)
    t = torch.randn(6, d, generator=g, dtype=torch.float64)
    x_ref, Jt_ref = torch.func.jvp(decoder, (z,), (t,))
    with torch.no_grad():
        x, Jt = push(z, t)
    assert rel_error(x, x_ref) < 1e-14
    assert rel_error(Jt, Jt_ref) < 1e-14


@pytest.mark.parametrize("name", DECODERS)
def test_official_gradient_equals_the_functorch_version(name, monkeypatch):
    """Same probes, the official rule (tol 1, min(11, d) iterations): the gradient with the
    official code's tangent pass equals the one with ``torch.func.jvp`` (the contender before)
    to float64 rounding, through CG and the double backward of the surrogate."""
    decoder, d, _ = _decoder(name)
    params = list(decoder.parameters())
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, d, generator=g, dtype=torch.float64, requires_grad=True)
    V = torch.randn(5, 2, d, generator=g, dtype=torch.float64)
    fair = _flat(logdet_official_cg(decoder, z, probes=V), [*params, z])
    monkeypatch.setattr(baselines, "tangent_pass", _functorch_pass)
    ref = _flat(logdet_official_cg(decoder, z, probes=V), [*params, z])
    assert rel_error(fair, ref) < 1e-13


@pytest.mark.parametrize("name", DECODERS)
def test_official_converged_matches_exact_gradient(name):
    """d scaled unit probes and CG to 1e-12: the official estimate is the exact gradient of
    log det(JᵀJ) (all parameters and z) on every kind of decoder."""
    decoder, d, _ = _decoder(name)
    B = 5
    z = torch.randn(B, d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z.requires_grad_(True)
    inputs = [*decoder.parameters(), z]
    truth = torch.cat([t.flatten() for t in grads(dense_logdet(decoder, z), inputs)])
    out = logdet_official_cg(
        decoder, z, probes=_unit_probes(B, d), tol=1e-12, min_iter=d, max_iter=10 * d
    )
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
