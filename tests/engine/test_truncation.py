"""Randomized truncation of CG (Roulette): the draw, the reweighting, unbiasedness, the wiring."""

import math
import warnings

import pytest
import torch

import rnf_fast
from rnf_fast import CG
from rnf_fast.engine.truncation import Roulette
from rnf_fast.testing import grads, mlp_decoder


def _problem(B=6, d=5, D=12, seed=0):
    decoder = mlp_decoder(d, D, hidden=(16,), seed=seed)
    z = torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return decoder, z.requires_grad_()


def _flat_grad(decoder, z, **kw):
    value, info = rnf_fast.logdet_grad(decoder, z, "cg", return_info=True, **kw)
    inputs = [*decoder.parameters(), z]
    return torch.cat([g.flatten() for g in grads(value, inputs)]), info


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"min_iter": 0}, "min_iter must be a positive integer"),
        ({"min_iter": 2.0}, "min_iter must be a positive integer"),
        ({"continue_prob": 0.0}, r"continue_prob must be in \(0, 1\)"),
        ({"continue_prob": 1.0}, r"continue_prob must be in \(0, 1\)"),
        ({"continue_prob": float("nan")}, r"continue_prob must be in \(0, 1\)"),
    ],
)
def test_roulette_validates(kw, match):
    with pytest.raises(ValueError, match=match):
        Roulette(**kw)


def test_cg_takes_only_a_roulette():
    with pytest.raises(TypeError, match="truncation must be None or a Roulette"):
        CG(truncation=(3, 0.5))
    # A generator with a tensor of probes draws the truncation.
    CG(probes=torch.ones(2, 1, 3), generator=torch.Generator(), truncation=Roulette())
    with pytest.raises(ValueError, match="generator applies to drawn probes"):
        CG(probes=torch.ones(2, 1, 3), generator=torch.Generator())


def test_draw_follows_its_survival_function():
    rule, cap, n = Roulette(min_iter=2, continue_prob=0.6), 9, 20_000
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([rule.draw(cap, gen)[0] for _ in range(n)])
    assert int(draws.min()) == 2 and int(draws.max()) <= cap
    for j, p in enumerate(rule.survival(cap), start=1):
        empirical = (draws >= j).double().mean().item()
        assert abs(empirical - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (j, empirical, p)
    assert draws.double().mean().item() == pytest.approx(rule.expected_iterations(cap), rel=0.02)
    J, weights = rule.draw(cap, torch.Generator().manual_seed(1))
    assert weights.shape == (J,)
    torch.testing.assert_close(
        weights, 1 / torch.tensor(rule.survival(cap)[:J], dtype=torch.float64)
    )


def test_truncated_gradient_is_unbiased_and_fixed_truncation_is_not():
    """The mean over draws of the reweighted gradient is the untruncated CG gradient for the
    same probes, within 4 standard errors; stopping at about the same mean number of
    iterations without the weights misses it by more (the test can tell the two apart)."""
    decoder, z = _problem()
    B, d = z.shape
    V = rnf_fast.make_probes(B, 1, d, generator=torch.Generator().manual_seed(3), dtype=z.dtype)
    rule, n = Roulette(min_iter=1, continue_prob=0.5), 600
    gen = torch.Generator().manual_seed(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol 0 and a draw that reaches the cap warn
        ref, _ = _flat_grad(decoder, z, probes=V, tol=0.0)
        samples = torch.stack(
            [
                _flat_grad(decoder, z, probes=V, tol=0.0, truncation=rule, generator=gen)[0]
                for _ in range(n)
            ]
        )
        fixed, _ = _flat_grad(decoder, z, probes=V, tol=0.0, max_iter=2)
    mean = samples.mean(0)
    se2 = samples.var(0).sum() / n  # E‖mean - ref‖² under unbiasedness
    # Measured: 0.17 for the reweighted mean, 106 for the fixed truncation (seeded).
    assert (mean - ref).pow(2).sum() <= 16 * se2
    assert (fixed - ref).pow(2).sum() > 16 * se2


def test_info_and_no_max_iter_warning_when_cut():
    decoder, z = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = rnf_fast.logdet_grad(
            decoder,
            z,
            "cg",
            tol=0.0,
            truncation=Roulette(1, 0.01),
            return_info=True,
            generator=torch.Generator().manual_seed(0),
        )
    assert info.cg.truncated_at == 1 and info.cg.matvecs == 1
    _, plain = rnf_fast.logdet_grad(decoder, z, "cg", return_info=True)
    assert plain.cg.truncated_at is None


def test_reaching_the_cap_warns_like_plain_cg():
    decoder, z = _problem()
    with pytest.warns(RuntimeWarning, match="reached max_iter"):
        rnf_fast.logdet_grad(
            decoder,
            z,
            "cg",
            tol=0.0,
            max_iter=2,
            truncation=Roulette(2, 0.5),
            generator=torch.Generator().manual_seed(0),
        )


def test_flat_keyword_and_object_agree():
    decoder, z = _problem()
    rule = Roulette(2, 0.5)
    a, ia = _flat_grad(decoder, z, truncation=rule, generator=torch.Generator().manual_seed(5))
    value, ib = rnf_fast.logdet_grad(
        decoder,
        z,
        CG(truncation=rule, generator=torch.Generator().manual_seed(5)),
        return_info=True,
    )
    b = torch.cat([g.flatten() for g in grads(value, [*decoder.parameters(), z])])
    assert ia.cg.truncated_at == ib.cg.truncated_at
    torch.testing.assert_close(a, b)
