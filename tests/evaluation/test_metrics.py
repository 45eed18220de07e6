"""Metrics against closed forms: Fréchet distance of Gaussians, AUROC against scikit-learn,
evaluate() against the analytic NLL of a linear injective flow with a Gaussian latent, and
samples with a numerically singular JᵀJ left out of every NLL number and counted."""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rnf_fast.data import Standardizer
from rnf_fast.evaluation import (
    auroc,
    data_log_prob,
    evaluate,
    format_metrics,
    frechet_distance,
    gaussian_frechet_distance,
    ood_auroc,
    ood_scores,
    reconstruction_error,
)
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import FoldedFlow

DT = torch.float64


def _spd(D, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=DT)
    return a @ a.T + 0.5 * torch.eye(D, dtype=DT)


def _with_moments(n, mean, cov, seed):
    """n samples whose sample mean and unbiased covariance are exactly mean and cov."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, mean.numel(), generator=g, dtype=DT)
    x = x - x.mean(0)
    L = torch.linalg.cholesky(x.T @ x / (n - 1))
    white = torch.linalg.solve_triangular(L, x.T, upper=False).T
    return white @ torch.linalg.cholesky(cov).T + mean


class LinearFlow:
    """x = W z + b with z ~ N(m, diag(s²)): an injective flow with an analytic density.

    encode(x) = P (x - b) with a left inverse P (d, D), P W = I; by default the least-squares
    one, so reconstruct is the orthogonal projection onto the plane.
    log p(x) = log N(z; m, s²) - ½ log det WᵀW at z = encode(x).
    """

    def __init__(self, W, b, m, s, P=None):
        self.W, self.b, self.m, self.s = W, b, m, s
        self.P = torch.linalg.pinv(W) if P is None else P
        self.d = W.shape[1]

    def encode(self, x):
        return (x - self.b) @ self.P.T

    def decode(self, z):
        return z @ self.W.T + self.b

    def reconstruct(self, x):
        return self.decode(self.encode(x))

    def log_prob(self, x):
        z = self.encode(x)
        base = torch.distributions.Normal(self.m, self.s).log_prob(z).sum(1)
        return base - 0.5 * torch.linalg.slogdet(self.W.T @ self.W)[1]

    def sample(self, n):
        return self.decode(self.m + self.s * torch.randn(n, self.d, dtype=self.W.dtype))


def _problem(n=400, D=5, d=2, noise=0.1, seed=0):
    """A LinearFlow, test data from it plus noise orthogonal to the plane, and the truth."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, d, generator=g, dtype=DT)
    b = torch.randn(D, generator=g, dtype=DT)
    m, s = torch.tensor([0.5, -1.0], dtype=DT), torch.tensor([1.0, 0.3], dtype=DT)
    model = LinearFlow(W, b, m, s)
    z = m + s * torch.randn(n, d, generator=g, dtype=DT)
    Q = torch.linalg.qr(W, mode="complete")[0][:, d:]  # basis of the orthogonal complement
    off = noise * torch.randn(n, D - d, generator=g, dtype=DT) @ Q.T
    x = model.decode(z) + off
    z_np, W_np = z.numpy(), W.numpy()
    true_log_p = (
        -0.5 * (((z_np - m.numpy()) / s.numpy()) ** 2).sum(1)
        - np.log(s.numpy()).sum()
        - 0.5 * d * np.log(2 * np.pi)
        - 0.5 * np.linalg.slogdet(W_np.T @ W_np)[1]
    )
    entropy = (
        0.5 * d * np.log(2 * np.pi * np.e)
        + np.log(s.numpy()).sum()
        + 0.5 * np.linalg.slogdet(W_np.T @ W_np)[1]
    )
    return model, x, off, true_log_p, float(entropy)


# --------------------------------------------------------------------------- Fréchet


def test_gaussian_frechet_closed_form_diagonal():
    m1, m2 = torch.tensor([0.0, 1.0, 2.0], dtype=DT), torch.tensor([1.0, -1.0, 2.0], dtype=DT)
    v1, v2 = torch.tensor([1.0, 4.0, 0.25], dtype=DT), torch.tensor([9.0, 1.0, 0.25], dtype=DT)
    expected = ((m1 - m2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum()
    got = gaussian_frechet_distance(m1, torch.diag(v1), m2, torch.diag(v2))
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_gaussian_frechet_matches_scipy_sqrtm_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    D = 6
    c1, c2 = _spd(D, 1), _spd(D, 2)
    m1, m2 = torch.randn(D, dtype=DT), torch.randn(D, dtype=DT)
    c1n, c2n = c1.numpy(), c2.numpy()
    cross = linalg.sqrtm(c1n @ c2n).real  # the FID reference formula
    expected = ((m1 - m2) ** 2).sum().item() + np.trace(c1n + c2n - 2 * cross)
    got = gaussian_frechet_distance(m1, c1, m2, c2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(gaussian_frechet_distance(m2, c2, m1, c1), rel=1e-9)


def test_frechet_distance_is_exact_for_samples_with_known_moments():
    D = 4
    m1, m2 = torch.zeros(D, dtype=DT), torch.arange(D, dtype=DT)
    c1, c2 = _spd(D, 3), _spd(D, 4)
    x, y = _with_moments(300, m1, c1, 5), _with_moments(200, m2, c2, 6)
    assert frechet_distance(x, y) == pytest.approx(
        gaussian_frechet_distance(m1, c1, m2, c2), rel=1e-10
    )
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_float32_input_and_shift():
    x = torch.randn(1000, 3)
    assert frechet_distance(x, x + 2.0) == pytest.approx(12.0, rel=1e-5)


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        (torch.randn(10, 3), torch.randn(10, 4), "same D"),
        (torch.randn(1, 3), torch.randn(10, 3), "x needs at least 2"),
        (torch.randn(10), torch.randn(10, 3), "x must be a float tensor"),
        (torch.randn(10, 3), torch.full((10, 3), float("nan")), "y contains NaN"),
    ],
)
def test_frechet_distance_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(x, y)


# ------------------------------------------------------------------------------ AUROC


def pairwise_auroc(scores_in, scores_out) -> float:
    """P(s_out > s_in) + ½ P(s_out = s_in), counted over every (in, out) pair: the definition
    of the AUROC, independent of the rank formula under test."""
    s_in = torch.as_tensor(scores_in, dtype=DT).flatten()
    s_out = torch.as_tensor(scores_out, dtype=DT).flatten()
    greater = (s_out[:, None] > s_in[None, :]).to(DT)
    equal = (s_out[:, None] == s_in[None, :]).to(DT)
    return float((greater + 0.5 * equal).mean())


def test_auroc_simple_cases():
    assert auroc([0.0, 1.0, 2.0], [3.0, 4.0]) == 1.0
    assert auroc([3.0, 4.0], [0.0, 1.0, 2.0]) == 0.0
    assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    assert auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.75
    assert auroc([0.0, float("-inf")], [float("inf"), 1.0]) == 1.0


def test_auroc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    s_in = rng.integers(0, 10, size=137).astype(float)  # many ties
    s_out = rng.integers(2, 12, size=91).astype(float)
    labels = np.r_[np.zeros(137), np.ones(91)]
    expected = metrics.roc_auc_score(labels, np.r_[s_in, s_out])
    assert auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)
    cont_in, cont_out = rng.normal(size=300), rng.normal(0.5, size=200)
    expected = metrics.roc_auc_score(np.r_[np.zeros(300), np.ones(200)], np.r_[cont_in, cont_out])
    assert auroc(cont_in, cont_out) == pytest.approx(expected, abs=1e-12)


def test_auroc_is_the_pairwise_count():
    g = torch.Generator().manual_seed(0)
    ties_in = torch.randint(0, 10, (137,), generator=g).to(DT)  # many ties
    ties_out = torch.randint(2, 12, (91,), generator=g).to(DT)
    infinite_in = torch.tensor([float("-inf"), 0.0, 1.0, float("inf")], dtype=DT)
    infinite_out = torch.tensor([float("inf"), 1.0, 5.0], dtype=DT)
    shifted_in = torch.randn(300, generator=g, dtype=DT)
    shifted_out = torch.randn(200, generator=g, dtype=DT) + 0.5
    for s_in, s_out in [
        (ties_in, ties_out),
        (infinite_in, infinite_out),
        (shifted_in, shifted_out),
    ]:
        expected = pairwise_auroc(s_in, s_out)
        assert auroc(s_in, s_out) == pytest.approx(expected, abs=1e-12)
        # Swapping the roles ranks the other way: the two areas add up to 1.
        assert auroc(s_out, s_in) == pytest.approx(1 - expected, abs=1e-12)
    # A shift by 0.5 of unit normals: P(s_out > s_in) = Φ(0.5 / √2) = 0.638, within 4 of the
    # Mann–Whitney standard errors √((n_in + n_out + 1) / (12 n_in n_out)) = 0.026.
    expected = 0.5 * (1 + math.erf(0.5 / 2))
    se = math.sqrt((300 + 200 + 1) / (12 * 300 * 200))
    assert abs(auroc(shifted_in, shifted_out) - expected) < 4 * se


def test_auroc_of_separated_reversed_and_identical_distributions():
    g = torch.Generator().manual_seed(1)
    s_in = torch.randn(400, generator=g, dtype=DT)
    assert auroc(s_in, s_in.max() + 1 + torch.rand(300, generator=g, dtype=DT)) == 1.0
    assert auroc(s_in, s_in.min() - 1 - torch.rand(300, generator=g, dtype=DT)) == 0.0
    # Same distribution: mean ½, standard error √((n_in + n_out + 1) / (12 n_in n_out)) (the
    # Mann–Whitney statistic under the null), 0.022 here; the bound is 4 of them.
    s_out = torch.randn(300, generator=g, dtype=DT)
    se = math.sqrt((400 + 300 + 1) / (12 * 400 * 300))
    assert abs(auroc(s_in, s_out) - 0.5) < 4 * se


def test_auroc_bad_input():
    with pytest.raises(ValueError, match="scores_in must be a non-empty 1-D"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="scores_out contains NaN"):
        auroc([1.0], [float("nan")])
    with pytest.raises(ValueError, match="scores_in must be a non-empty 1-D"):
        auroc(np.zeros((2, 2)), [1.0])


# ----------------------------------------------------------------- reconstruction error


def test_reconstruction_error_per_sample_and_mean():
    x = torch.zeros(2, 4)
    x_rec = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    assert torch.equal(reconstruction_error(x, x_rec, per_sample=True), torch.tensor([1.0, 1.0]))
    assert reconstruction_error(x, x_rec).item() == 1.0
    images = torch.zeros(3, 1, 2, 2)
    assert reconstruction_error(images, images + 0.5).item() == 0.25
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_error(x, x_rec[:1])


# ------------------------------------------------------------------------- evaluate


def test_evaluate_gives_the_analytic_nll_recon_error_and_truth_metrics():
    model, x, off, true_log_p, entropy = _problem()
    project = model.reconstruct  # the true manifold is the model's plane
    dataset = SimpleNamespace(
        entropy=entropy,
        true_log_prob=model.log_prob,
        project=project,
    )
    out = evaluate(model, x, dataset=dataset, n_samples=4000, batch_size=64)
    nll = -true_log_p
    assert out["nll"] == pytest.approx(nll.mean(), rel=1e-12)
    assert out["nll_se"] == pytest.approx(nll.std(ddof=1) / math.sqrt(len(nll)), rel=1e-10)
    assert out["recon_error"] == pytest.approx(float(off.square().mean()), rel=1e-10)
    assert abs(out["nll"] - entropy) < 4 * out["nll_se"]  # data drawn from the model
    assert out["entropy"] == entropy and out["nll_gap"] == pytest.approx(out["nll"] - entropy)
    assert out["test_true_nll"] == pytest.approx(nll.mean(), rel=1e-12)  # of the dataset
    assert out["recon_manifold_distance"] < 1e-10
    assert out["sample_manifold_distance"] < 1e-10
    # Samples come from the plane while x carries off-plane noise (variance 0.01 in 3 dims).
    assert out["frechet"] == pytest.approx(0.03, abs=0.03)
    assert out["nonfinite"] == 0 and out["n_test"] == 400 and out["n_samples"] == 4000
    assert out["singular"] == 0  # a model with log_prob only has none
    assert "nll_standardized" not in out


@pytest.mark.parametrize("mode", ["global", "feature"])
def test_evaluate_in_data_units_behind_a_standardizer(mode):
    model, x, _, _, _ = _problem(seed=1)
    x = x * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5], dtype=DT)  # anisotropic data
    model.W = model.W * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5], dtype=DT)[:, None]
    model.b = model.b * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5], dtype=DT)
    st = Standardizer(mode=mode).fit(x)
    # The same flow seen in standardised units: decode_std = transform ∘ decode, and
    # encode_std = encode ∘ inverse_transform.
    S = st.scale
    W_std, b_std, P_std = model.W / S[:, None], (model.b - st.mean) / S, model.P * S
    inner = LinearFlow(W_std, b_std, model.m, model.s, P=P_std)
    raw = evaluate(model, x, n_samples=300, seed=3)
    std = evaluate(inner, x, standardizer=st, n_samples=300, seed=3)
    for key in ("nll", "nll_se", "recon_error"):
        assert std[key] == pytest.approx(raw[key], rel=1e-9), key
    # Samples lie on a plane: singular covariances, whose square roots amplify round-off.
    assert std["frechet"] == pytest.approx(raw["frechet"], abs=1e-5)
    assert std["nll_standardized"] == pytest.approx(-inner.log_prob(st.transform(x)).mean().item())
    lp = data_log_prob(inner, x, standardizer=st, batch_size=7)
    torch.testing.assert_close(lp, model.log_prob(x), rtol=1e-10, atol=1e-10)


def test_evaluate_seeds_samples_and_restores_the_global_rng():
    model, x, _, _, _ = _problem(n=50)
    state = torch.get_rng_state()
    a = evaluate(model, x, n_samples=20, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert evaluate(model, x, n_samples=20, seed=7)["frechet"] == a["frechet"]
    assert "frechet" not in evaluate(model, x, n_samples=0)


def test_ood_scores_and_auroc():
    model, x_in, _, _, _ = _problem(n=100, noise=0.01)
    x_out = x_in + 2.0  # leaves the plane: reconstruction error separates perfectly
    scores = ood_scores(model, x_in)
    assert set(scores) == {"nll", "recon_error"} and scores["nll"].shape == (100,)
    torch.testing.assert_close(scores["nll"], -model.log_prob(x_in))
    aucs = ood_auroc(model, x_in, x_out)
    assert aucs["recon_error"] == 1.0
    # x_out as the positives, scored by -log p of the model.
    expected = pairwise_auroc(-model.log_prob(x_in), -model.log_prob(x_out))
    assert aucs["nll"] == pytest.approx(expected, abs=1e-12)


def test_evaluate_bad_input():
    model, x, _, _, _ = _problem(n=20)
    with pytest.raises(ValueError, match=r"test_x must be a float tensor \(N, D\)"):
        evaluate(model, x[0])
    with pytest.raises(ValueError, match="test_x contains NaN"):
        evaluate(model, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="n_samples"):
        evaluate(model, x, n_samples=1)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, x, batch_size=0)

    class NoSample:
        log_prob = model.log_prob
        reconstruct = model.reconstruct

    with pytest.raises(TypeError, match="model must have the method.*sample"):
        evaluate(NoSample(), x)
    assert "frechet" not in evaluate(NoSample(), x, n_samples=0)


def test_format_metrics_puts_nll_beside_reconstruction_error():
    model, x, _, _, entropy = _problem(n=50)
    line = format_metrics(evaluate(model, x, dataset=SimpleNamespace(entropy=entropy)))
    assert line.startswith("test NLL ") and "true entropy" in line
    assert line.index("test NLL") < line.index("recon MSE") < line.index("Fréchet")


# -------------------------------------------------------------------- singular samples


CONFIG = FlowConfig(D=3, d=2, f_layers=2, f_hidden=(8,), h_layers=1)


def _flow(cls, x):
    model = cls(CONFIG).to(DT)
    model.initialize(x)
    return model.eval()


def _rows(n, seed):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _folded(model, x):
    """The rows whose JᵀJ the fold makes singular, known without the engine."""
    with torch.no_grad():
        return model.encode(x)[:, 0] <= 0


def _call(fn, *args, **kw):
    """fn's result and the messages of the RuntimeWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kw)
    return out, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_evaluate_leaves_singular_samples_out_of_the_nll_and_counts_them():
    x = _rows(40, seed=0)
    model = _flow(FoldedFlow, x)
    singular = _folded(model, x)
    k = int(singular.sum())
    assert 0 < k < 40
    kept = ~singular
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_p = model.log_prob(x)
    dataset = SimpleNamespace(true_log_prob=lambda t: -t.square().sum(1))
    # batch_size 16: three calls of the model, one warning.
    out, messages = _call(evaluate, model, x, dataset=dataset, n_samples=0, batch_size=16)
    nll = -log_p[kept]
    assert out["singular"] == k and out["n_test"] == 40 and out["nonfinite"] == 0
    assert out["nll"] == pytest.approx(float(nll.mean()), rel=1e-12)
    assert out["nll_se"] == pytest.approx(float(nll.std() / math.sqrt(40 - k)), rel=1e-10)
    # The true NLL on the same samples as "nll"; reconstructions of every sample.
    assert out["test_true_nll"] == pytest.approx(float(x[kept].square().sum(1).mean()))
    with torch.no_grad():
        recon = reconstruction_error(x, model.reconstruct(x))
    assert out["recon_error"] == pytest.approx(float(recon), rel=1e-12)
    assert len(messages) == 1, messages  # the model's own warnings are gathered into this one
    assert messages[0].startswith(f"{k} of 40 test samples have a numerically singular JᵀJ")
    assert "left out of the NLL numbers" in messages[0]
    assert f"({k} singular samples left out)" in format_metrics(out)


def test_evaluate_of_a_healthy_flow_counts_no_singular_sample_and_warns_nothing():
    x = _rows(30, seed=1)
    model = _flow(RectangularFlow, x)
    out, messages = _call(evaluate, model, x, n_samples=0, batch_size=16)
    assert out["singular"] == 0 and not messages
    assert out["nll"] == -float(model.log_prob(x).double().mean())
    assert "singular" not in format_metrics(out)


def test_nll_standardized_leaves_the_singular_samples_out_too():
    x = 3.0 * _rows(40, seed=2) + 1.0
    st = Standardizer(mode="global").fit(x)
    model = _flow(FoldedFlow, st.transform(x))
    singular = _folded(model, st.transform(x))
    assert singular.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        log_p = model.log_prob(st.transform(x))
    out, messages = _call(evaluate, model, x, standardizer=st, n_samples=0)
    assert out["singular"] == int(singular.sum()) and len(messages) == 1
    expected = -float(log_p[~singular].mean())
    assert out["nll_standardized"] == pytest.approx(expected, rel=1e-12)
    # Data units: the global scale s adds d · log s to every kept sample's NLL.
    assert out["nll"] == pytest.approx(expected + 2 * math.log(float(st.scale[0])), rel=1e-12)


def test_per_sample_scores_are_nan_and_the_nll_auroc_leaves_singular_samples_out():
    x_in = _rows(30, seed=3)
    x_out = _rows(25, seed=4) + 1.5
    model = _flow(FoldedFlow, x_in)
    s_in, s_out = _folded(model, x_in), _folded(model, x_out)
    assert s_in.any() and s_out.any()
    log_p, messages = _call(data_log_prob, model, x_in, batch_size=8)
    assert torch.equal(log_p.isnan(), s_in)
    assert len(messages) == 1 and messages[0].startswith(f"{int(s_in.sum())} of 30 samples")
    scores, messages = _call(ood_scores, model, x_out)
    assert torch.equal(scores["nll"].isnan(), s_out) and len(messages) == 1
    aucs, messages = _call(ood_auroc, model, x_in, x_out)
    expected = pairwise_auroc(-log_p[~s_in], scores["nll"][~s_out])
    assert aucs["nll"] == pytest.approx(expected, abs=1e-12)
    # The reconstruction AUROC uses every sample of both sets.
    scores_in, _ = _call(ood_scores, model, x_in)
    assert aucs["recon_error"] == auroc(scores_in["recon_error"], scores["recon_error"])
    assert len(messages) == 1
    counts = f"{int(s_in.sum())} of 30 in-distribution and {int(s_out.sum())} of 25 out-of"
    assert messages[0].startswith(counts)
