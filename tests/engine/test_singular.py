"""Rank deficiency is never silent: rank-deficient decoders warn (or raise) in every seed, on
both methods and in both precisions, well-conditioned ones never do; a decoder whose output does
not depend on z gets an error that says so."""

import warnings

import pytest
import torch
from torch import nn

import rnf_fast
from rnf_fast.engine.checks import pivot_floor, ritz_floor

SEEDS = range(20)
DTYPES = [torch.float32, torch.float64]
METHODS = ["exact", "cg"]


def _rank1_linear(dtype, seed):
    # The decoder: the second weight column a multiple of the first (rank 1 < d = 2).
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(2, 6, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 2, generator=g, dtype=dtype))
        lin.weight[:, 1] = 0.7 * lin.weight[:, 0]
    return lin, torch.randn(16, 2, generator=g, dtype=dtype)


def _deficient_mlp(dtype, seed):
    # A nonlinear decoder whose first layer has rank 2 < d = 3: J = W3 D2 W2 D1 W1 has rank 2.
    # The null vector (1.7, 0.3, 1) has no ±1 combination orthogonal to it, so no Rademacher
    # probe hides it from CG.
    torch.manual_seed(seed)
    mlp = nn.Sequential(
        nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)
    ).to(dtype)
    with torch.no_grad():
        w = mlp[0].weight
        w[:, 2] = -1.7 * w[:, 0] - 0.3 * w[:, 1]
    return mlp, torch.randn(16, 3, dtype=dtype)


def _healthy_mlp(dtype, seed):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 8)).to(dtype)
    return mlp, torch.randn(16, 3, dtype=dtype)


def _call(decoder, z, method, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value, info = rnf_fast.logdet_grad(decoder, z, method, return_info=True, **kwargs)
    singular_warnings = [w for w in caught if "rank deficient" in str(w.message)]
    return value, info, singular_warnings


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [_rank1_linear, _deficient_mlp])
def test_rank_deficient_decoders_warn_in_every_seed(make, dtype, method):
    # Before: a float32 rank-1 linear decoder returned ~ -35 with no warning in 8-9 of 20 seeds.
    for seed in SEEDS:
        decoder, z = make(dtype, seed)
        value, info, caught = _call(decoder, z, method)
        assert len(caught) == 1, f"seed {seed}: {len(caught)} warnings (one per call expected)"
        assert bool(info.singular.all()), f"seed {seed}: {info.singular.tolist()}"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [_rank1_linear, _deficient_mlp])
def test_rank_deficient_decoders_raise_on_request(make, dtype, method):
    for seed in SEEDS:
        decoder, z = make(dtype, seed)
        with pytest.raises(rnf_fast.SingularJacobianError, match="rank deficient to float"):
            rnf_fast.logdet_grad(decoder, z, method, on_singular="raise")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_values_are_nan_on_request(dtype, method):
    decoder, z = _rank1_linear(dtype, 0)
    value, info, caught = _call(decoder, z, method, on_singular="nan")
    assert len(caught) == 1 and bool(torch.isnan(value).all())
    assert "16 have a NaN log det" in str(caught[0].message)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_well_conditioned_decoders_never_warn(dtype, method):
    for seed in SEEDS:
        decoder, z = _healthy_mlp(dtype, seed)
        _, info, caught = _call(decoder, z, method)
        assert not caught and not bool(info.singular.any()), f"seed {seed}"


def test_floors_follow_the_jacobian_dtype():
    # float32 J: the floor is set by float32 even though A is factored in float64.
    assert pivot_floor(torch.float32, torch.float64) == (100 * torch.finfo(torch.float32).eps) ** 2
    assert pivot_floor(torch.float64, torch.float64) == 100 * torch.finfo(torch.float64).eps
    assert ritz_floor(torch.float32) == 3 * torch.finfo(torch.float32).eps


def test_ill_conditioned_but_resolved_float32_is_not_flagged():
    # κ(J) = 1e3: below exact's float32 bound (8.4e4) and CG's (1.7e3): a valid sample.
    W = torch.tensor([[1.0, 0.0], [0.0, 1e-3], [0.0, 0.0]])
    z = torch.randn(4, 2)
    for method in ("exact", "cg"):
        _, info, caught = _call(lambda z: z @ W.T, z, method)
        assert not caught and not bool(info.singular.any()), method


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "decoder",
    [
        lambda z: torch.zeros(z.shape[0], 5, dtype=z.dtype),
        lambda z: torch.ones(z.shape[0], 5, dtype=z.dtype) + 0 * z.sum(1, keepdim=True),
    ],
    ids=["zeros", "constant plus 0 z"],
)
def test_decoder_independent_of_z_says_so(decoder, method):
    # Before: "Jacobian is rank deficient" (or a NaN), not the cause.
    z = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not depend on z: J = 0"):
        rnf_fast.logdet_grad(decoder, z, method)


def test_probes_orthogonal_to_the_null_space_are_not_a_false_j_zero():
    # J ≠ 0 but J p = 0 for the probe (1, -1): CG must not call the decoder constant.
    def decoder(z):
        s = z.sum(1, keepdim=True)
        return torch.cat([s, s.sin(), s**2], dim=1)

    z = torch.randn(3, 2, dtype=torch.float64)
    probes = torch.tensor([1.0, -1.0], dtype=torch.float64).expand(3, 1, 2)
    with pytest.warns(RuntimeWarning):
        rnf_fast.logdet_grad(decoder, z, "cg", probes=probes)


def test_cg_stopped_before_the_tolerance_is_not_a_singular_sample():
    # A well-posed system cut short (max_iter below what the tolerance needs, as float32
    # products do to ill-conditioned image flows) is biased, not singular: only the max_iter
    # warning, no singular sample.
    W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.01], [1.0, 1.0, 1.0]])
    z = torch.randn(8, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, info = rnf_fast.logdet_grad(
            lambda z: z @ W.T, z, "cg", probes=1, max_iter=1, tol=1e-6, return_info=True
        )
    assert not bool(info.cg.converged.all())  # the premise: some systems were cut short
    assert not bool(info.singular.any())
    assert any("max_iter" in str(w.message) for w in caught)
    assert not any("rank deficient" in str(w.message) for w in caught)
