"""RectangularFlow: log_prob against a dense float64 computation, singular samples marked,
left inverse, sampling, save/load, and input errors."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

from rnf_fast import SingularJacobianError
from rnf_fast.models import CheckpointError, FlowConfig, RectangularFlow
from rnf_fast.models.rectangular import SINGULAR_WARNING
from rnf_fast.testing import FoldedFlow, dense_jacobian, dense_logdet, rel_error

DTYPE = torch.float64

CONFIGS = {
    "affine": FlowConfig(D=5, d=2, f_layers=2, f_hidden=(8,), h_layers=2, h_hidden=(8,)),
    "spline": FlowConfig(
        D=4, d=2, f_layers=2, f_hidden=(8,), f_coupling="spline", h_coupling="spline"
    ),
    "d=1": FlowConfig(D=3, d=1, f_layers=2, f_hidden=(8,), h_layers=2, seed=3),
    "image": FlowConfig(
        D=16, d=3, image_shape=(1, 4, 4), image_scales=2, image_blocks=1, image_channels=4
    ),
}


def data(n: int, D: int, *, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.randn(n, D, generator=generator, dtype=DTYPE)


def randomized(config: FlowConfig, *, std: float = 0.1) -> RectangularFlow:
    """A float64 model with ActNorm initialised and every parameter perturbed (no identities)."""
    model = RectangularFlow(config).to(DTYPE)
    model.initialize(data(64, config.D))
    generator = torch.Generator().manual_seed(config.seed + 7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return model.eval()


def dense_log_prob(model: RectangularFlow, x: torch.Tensor) -> torch.Tensor:
    """log N(h⁻¹(z)) + log|det ∂h⁻¹/∂z| - ½ log det(JᵀJ), every Jacobian dense."""
    z = model.encode(x).detach()
    u = model.h.inverse(z)[0]
    J_h = dense_jacobian(lambda v: model.h.inverse(v)[0], z)
    log_pz = -0.5 * (u * u).sum(1) - 0.5 * model.d * math.log(2 * math.pi)
    log_pz = log_pz + torch.linalg.slogdet(J_h)[1]
    return (log_pz - 0.5 * dense_logdet(model.decode, z)).detach()


@pytest.mark.parametrize("name", ["affine", "spline", "d=1", "image"])
def test_log_prob_matches_dense_computation(name):
    model = randomized(CONFIGS[name])
    x = data(5, model.D, seed=2)
    expected = dense_log_prob(model, x)
    assert rel_error(model.log_prob(x), expected) < 1e-10
    assert rel_error(model.log_prob(x, chunk_size=3), expected) < 1e-10


@pytest.mark.parametrize("name", ["affine", "spline", "d=1", "image"])
def test_encode_is_a_left_inverse_of_decode(name):
    model = randomized(CONFIGS[name])
    z = torch.randn(7, model.d, dtype=DTYPE)
    torch.testing.assert_close(model.encode(model.decode(z)), z, atol=1e-10, rtol=0)
    x = data(7, model.D)
    projection = model.reconstruct(x)
    torch.testing.assert_close(model.reconstruct(projection), projection, atol=1e-10, rtol=0)


def test_log_prob_terms_are_consistent():
    model = randomized(CONFIGS["affine"])
    x = data(6, model.D)
    terms = model.log_prob_terms(x)
    torch.testing.assert_close(terms.log_prob, terms.log_pz - 0.5 * terms.logdet)
    torch.testing.assert_close(terms.sq_error, ((x - model.reconstruct(x)) ** 2).sum(1))
    assert not terms.log_prob.requires_grad
    assert terms.singular.dtype == torch.bool and terms.singular.shape == (6,)
    assert not terms.singular.any()


def folded() -> tuple[FoldedFlow, torch.Tensor, torch.Tensor]:
    """A float64 FoldedFlow, 20 rows of data, and the rows it folds (known without the engine)."""
    model = FoldedFlow(FlowConfig(D=3, d=2, f_layers=2, f_hidden=(8,), h_layers=1)).to(DTYPE)
    x = data(20, 3, seed=4)
    model.initialize(x)
    model.eval()
    with torch.no_grad():
        return model, x, model.encode(x)[:, 0] <= 0


def runtime_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_singular_samples_are_marked_and_nan_by_default_with_one_warning():
    model, x, folded_rows = folded()
    rows = folded_rows.nonzero().squeeze(-1).tolist()
    assert 0 < len(rows) < len(x) and max(rows) >= 7  # some beyond the first chunk of 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        terms = model.log_prob_terms(x, chunk_size=7)
        log_prob = model.log_prob(x, chunk_size=7)
    assert torch.equal(terms.singular, folded_rows)
    # NaN exactly where marked, in log det and log p (and in log_prob, which routes here).
    assert torch.equal(terms.logdet.isnan(), folded_rows)
    assert torch.equal(terms.log_prob.isnan(), folded_rows)
    assert torch.equal(log_prob.isnan(), folded_rows)
    # The latent density and the reconstruction error are those of any sample.
    with torch.no_grad():
        torch.testing.assert_close(terms.log_pz, model.latent_log_prob(model.encode(x)))
        torch.testing.assert_close(terms.sq_error, ((x - model.reconstruct(x)) ** 2).sum(1))
    # The other samples keep their exact log p.
    kept = ~folded_rows
    assert rel_error(terms.log_prob[kept], dense_log_prob(model, x[kept])) < 1e-10
    # One warning for the call (not one per chunk, nor the engine's), naming rows of x.
    messages = runtime_warnings(caught)
    assert len(messages) == 2  # log_prob_terms, then log_prob
    head = f"{SINGULAR_WARNING} for {len(rows)} of 20 sample(s) (rows {rows[:10]}"
    assert messages[0].startswith(head) and messages[0] == messages[1]
    assert "logdet and log_prob are NaN" in messages[0]


def test_on_singular_jitter_keeps_values_and_raise_names_the_rows():
    model, x, folded_rows = folded()
    kept = ~folded_rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nan = model.log_prob_terms(x, chunk_size=7)
        jitter = model.log_prob_terms(x, chunk_size=7, on_singular="jitter")
    # The mask does not depend on the choice, nor do the samples that are not singular.
    assert torch.equal(jitter.singular, folded_rows)
    assert torch.equal(jitter.log_prob[kept], nan.log_prob[kept])
    # "raise" stops at the first chunk (rows 0-6) with a singular sample, naming its rows.
    first = [r for r in folded_rows.nonzero().squeeze(-1).tolist() if r < 7]
    assert first  # the data has some in the first chunk
    message = f"for {len(first)} of the 7 sample(s) of the chunk from row 0 (rows {first}"
    with pytest.raises(SingularJacobianError, match=re.escape(message)):
        model.log_prob_terms(x, chunk_size=7, on_singular="raise")
    with pytest.raises(ValueError, match="on_singular must be 'jitter', 'raise' or 'nan'"):
        model.log_prob(x, on_singular="skip")


def test_same_config_builds_the_same_model_and_seed_changes_it():
    a, b = RectangularFlow(CONFIGS["affine"]), RectangularFlow(CONFIGS["affine"].to_dict())
    for (key, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), key
    other = RectangularFlow({**CONFIGS["affine"].to_dict(), "seed": 1})
    assert not torch.equal(a.pad_permutation.perm, other.pad_permutation.perm)


def test_sample_and_rsample():
    model = randomized(CONFIGS["affine"])
    first = model.sample(5, generator=torch.Generator().manual_seed(0))
    again = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert first.shape == (5, model.D) and not first.requires_grad
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    x = model.rsample(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.detach(), first, atol=0, rtol=0)
    x.sum().backward()
    assert model.f.layers[-1].conditioner.linears[0].weight.grad is not None
    # Samples lie on the manifold: projecting them changes nothing.
    torch.testing.assert_close(model.reconstruct(first), first, atol=1e-10, rtol=0)


def test_initialize_sets_every_actnorm_once():
    model = RectangularFlow(CONFIGS["affine"]).to(DTYPE)
    assert not model.actnorms_initialized()
    model.eval()
    model.initialize(data(32, model.D))
    assert model.actnorms_initialized() and not model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.initialize(data(32, model.D, seed=5))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_load_gives_identical_log_prob(tmp_path, dtype):
    model = randomized(CONFIGS["d=1"]).to(dtype)
    x = data(8, model.D).to(dtype)
    model.save(tmp_path / "model.pt")
    loaded = RectangularFlow.load(tmp_path / "model.pt").eval()
    assert loaded.config == model.config
    assert next(loaded.parameters()).dtype == dtype
    torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), atol=0, rtol=0)
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_load_rejects_corrupt_wrong_and_mismatched_files(tmp_path):
    model = randomized(CONFIGS["affine"])
    path = tmp_path / "model.pt"
    model.save(path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        RectangularFlow.load(truncated)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="expected a 'rnf_fast.RectangularFlow'"):
        RectangularFlow.load(tmp_path / "other.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["f_hidden"] = (9,)
    torch.save(payload, tmp_path / "mismatched.pt")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        RectangularFlow.load(tmp_path / "mismatched.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        RectangularFlow.load(tmp_path / "missing.pt")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"D": 3, "d": 3}, "d must be < D"),
        ({"D": 3, "d": 0}, "d must be a positive integer"),
        ({"D": 3, "d": 1, "f_coupling": "glow"}, "f_coupling must be one of"),
        ({"D": 3, "d": 1, "f_hidden": (8, 0)}, r"f_hidden\[1\]"),
        ({"D": 8, "d": 1, "image_shape": (1, 2, 2)}, "image_shape must be"),
        ({"D": 3, "d": 1, "width": 3}, r"unknown FlowConfig option\(s\) \['width'\]"),
    ],
)
def test_bad_config_raises(options, message):
    with pytest.raises(ValueError, match=message):
        RectangularFlow(options)


def test_bad_inputs_raise():
    model = randomized(CONFIGS["affine"])
    shape = r"x must be \(B, D\) = \(B, 5\) with B >= 1, got \(4, 3\)"
    with pytest.raises(ValueError, match=shape):
        model.log_prob(torch.zeros(4, 3, dtype=DTYPE))
    x = data(4, 5)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or Inf in 1 of 4 rows"):
        model.encode(x)
    with pytest.raises(ValueError, match=r"z must be \(B, d\) = \(B, 2\)"):
        model.decode(torch.zeros(4, 3, dtype=DTYPE))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model.encode(torch.zeros(4, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model.log_prob(data(4, 5), chunk_size=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)
