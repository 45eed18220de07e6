"""Numbers that judge a rectangular flow: test NLL, reconstruction error, Fréchet distance, AUROC.

The NLL of a rectangular flow is the density at the projection of x onto the *learned*
manifold, so a shrunken manifold lowers it (DESIGN.md §5). It is therefore never reported
alone: :func:`evaluate` puts it beside the reconstruction error and the Fréchet distance of
model samples to the test data, and, where the dataset knows its density, beside the true
entropy and the distance of samples from the true manifold.

Models are duck-typed: anything with the methods a function needs (``encode(x)``,
``decode(z)``, ``reconstruct(x)``, ``log_prob(x)``, ``sample(n)``, acting on (B, D) and (B, d)
tensors in model units) will do. When the model was trained on standardised data, pass the
``Standardizer``: inputs are then taken in data units and every result is in data units.

Singular samples: where the model's JᵀJ is numerically singular (its decoder's Jacobian rank
deficient to the model's precision) the log det is rounding error, not a density, and would
flatter the NLL. A model with ``log_prob_terms(x)`` (a ``RectangularFlow``) is evaluated through
it, and the samples its ``LogProbTerms.singular`` marks are left out of every NLL mean,
standard error and NLL AUROC, counted in the results (``evaluate``'s ``"singular"``) and named
in one warning per call; per-sample results (:func:`data_log_prob`, :func:`ood_scores`) hold
NaN for them. Reconstruction errors and distances use every sample: they are defined there. A
model with ``log_prob`` only is taken to have no singular samples.

Example:
    >>> import torch
    >>> from rnf_fast.evaluation import auroc, frechet_distance
    >>> x = torch.randn(500, 3, dtype=torch.float64)
    >>> round(frechet_distance(x, x), 12)
    0.0
    >>> round(frechet_distance(x, x + 2.0), 12)  # a shift by m adds ‖m‖² = 3 · 2²
    12.0
    >>> auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0]))  # out-scores all larger
    1.0
    >>> auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]))  # 3 of the 4 pairs
    0.75
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rnf_fast.engine.checks import warn_at_caller
from rnf_fast.linearize.base import linearize
from rnf_fast.models.rectangular import SINGULAR_WARNING

__all__ = [
    "auroc",
    "data_log_prob",
    "evaluate",
    "format_metrics",
    "frechet_distance",
    "gaussian_frechet_distance",
    "ood_auroc",
    "ood_scores",
    "reconstruction_error",
]

ArrayLike = Tensor | np.ndarray | Sequence[float]


# ---------------------------------------------------------------------------------- checks


def _require(model: object, *methods: str) -> None:
    missing = [m for m in methods if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"model must have the method(s) {', '.join(missing)}; got {type(model).__name__}"
        )


def _check_samples(name: str, x: object, *, min_rows: int = 1) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor (N, D), got {got}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


# ------------------------------------------------------------------------- plain metrics


def reconstruction_error(x: Tensor, x_rec: Tensor, *, per_sample: bool = False) -> Tensor:
    """Mean squared reconstruction error: per sample, mean over features of (x - x_rec)².

    This is the training penalty ‖x - g(g†(x))‖² divided by D, so it does not grow with D.

    Arguments:
        x: (B, ...) data; x_rec: reconstructions, the same shape.
        per_sample: return the (B,) per-sample errors instead of their mean.
    Returns:
        0-dim tensor (mean over samples), or (B,) with ``per_sample=True``.
    """
    if not isinstance(x, Tensor) or not isinstance(x_rec, Tensor):
        raise TypeError("x and x_rec must be tensors")
    if x.shape != x_rec.shape or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(
            f"x and x_rec must have the same shape (B, ...), got {tuple(x.shape)} and "
            f"{tuple(x_rec.shape)}"
        )
    err = (x - x_rec).reshape(x.shape[0], -1).square().mean(1)
    return err if per_sample else err.mean()


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix through its eigendecomposition."""
    w, V = torch.linalg.eigh(0.5 * (a + a.mT))
    return (V * w.clamp_min(0).sqrt()) @ V.mT


def gaussian_frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mean1, cov1) and N(mean2, cov2).

        ‖μ₁ - μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁^½ Σ₂ Σ₁^½)^½)

    Computed in float64 with symmetric eigendecompositions (no complex round-off as with a
    general matrix square root); negative eigenvalues from round-off are clamped to 0.

    Arguments:
        mean1, mean2: (D,); cov1, cov2: (D, D) symmetric positive semi-definite.
    Returns:
        The distance, >= 0.
    """
    D = mean1.shape[-1] if isinstance(mean1, Tensor) and mean1.dim() == 1 else None
    for name, t, shape in (
        ("mean1", mean1, (D,)),
        ("mean2", mean2, (D,)),
        ("cov1", cov1, (D, D)),
        ("cov2", cov2, (D, D)),
    ):
        if D is None or not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor {shape if D else '(D,)'}, got {got}")
    m1, m2, c1, c2 = (t.detach().to(torch.float64) for t in (mean1, mean2, cov1, cov2))
    s1 = _sqrtm_psd(c1)
    cross = torch.linalg.eigvalsh(s1 @ c2.to(s1.device) @ s1).clamp_min(0).sqrt().sum()
    value = (m1 - m2.to(m1.device)).square().sum() + c1.trace() + c2.trace() - 2 * cross
    return max(float(value), 0.0)


def _mean_cov(x: Tensor) -> tuple[Tensor, Tensor]:
    x = x.detach().to(torch.float64)
    mean = x.mean(0)
    xc = x - mean
    return mean, xc.mT @ xc / (x.shape[0] - 1)


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sample sets (the FID formula on raw x).

    The means and unbiased covariances of x and y go into :func:`gaussian_frechet_distance`.
    The tabular sample-quality metric of the rectangular-flows paper; 0 for identical sets.

    Arguments:
        x: (N, D) samples, N >= 2; y: (M, D) samples, M >= 2.
    Returns:
        The distance (float, >= 0), computed in float64.
    """
    _check_samples("x", x, min_rows=2)
    _check_samples("y", y, min_rows=2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same D, got {x.shape[1]} and {y.shape[1]}")
    return gaussian_frechet_distance(*_mean_cov(x), *_mean_cov(y.to(x.device)))


def _scores(name: str, s: ArrayLike) -> Tensor:
    t = torch.as_tensor(s).detach().to("cpu", torch.float64)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of scores, got {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    return t


def auroc(scores_in: ArrayLike, scores_out: ArrayLike) -> float:
    """Area under the ROC curve for telling out-of-distribution from in-distribution samples.

    Larger scores must mean "more out-of-distribution" (e.g. NLL, reconstruction error):
    the result is P(s_out > s_in) + ½ P(s_out = s_in), the Mann–Whitney statistic computed
    from average ranks, equal to ``sklearn.metrics.roc_auc_score`` with out as the positive
    class. 1 is perfect separation, 0.5 chance, below 0.5 the score ranks the wrong way.

    Arguments:
        scores_in: (N_in,) scores of in-distribution samples; ±inf allowed, NaN not.
        scores_out: (N_out,) scores of out-of-distribution samples.
    Returns:
        AUROC in [0, 1].
    """
    s_in, s_out = _scores("scores_in", scores_in), _scores("scores_out", scores_out)
    values, inverse, counts = torch.unique(
        torch.cat([s_in, s_out]), sorted=True, return_inverse=True, return_counts=True
    )
    # Tied values share the average of the ranks they occupy (1-based).
    ends = counts.cumsum(0).to(torch.float64)
    ranks = (ends - 0.5 * (counts - 1))[inverse]
    n_in, n_out = s_in.numel(), s_out.numel()
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


# --------------------------------------------------------------------- model evaluation


def _tangent(model: Any, y: Tensor) -> Tensor:
    """Jacobian J (B, D, d) of model.decode at model.encode(y), by d forward-mode tangents."""
    z = model.encode(y).detach()
    B, d = z.shape
    eye = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)
    return linearize(model.decode, z).jvp(eye).mT


def _latent_dim(model: Any, y: Tensor) -> int:
    d = getattr(model, "d", None)
    if isinstance(d, int) and not isinstance(d, bool):
        return d
    _require(model, "encode")
    return model.encode(y[:1]).shape[1]


def _log_det_correction(model: Any, y: Tensor, standardizer: Any) -> Tensor:
    """log p_data - log p_std at standardised points y (B, D): 0-dim, or (B,) per sample."""
    scale = standardizer.scale
    if scale is None:
        raise ValueError("standardizer is not fitted")
    d = _latent_dim(model, y)
    if d == y.shape[1] or torch.allclose(scale, scale[:1].expand_as(scale)):
        return standardizer.log_abs_det_jacobian(d=d).to(y)
    _require(model, "encode", "decode")
    return standardizer.log_abs_det_jacobian(tangent=_tangent(model, y)).to(y)


def _log_prob(model: Any, y: Tensor) -> tuple[Tensor, Tensor]:
    """log p (B,) float64 in model units and the singular samples (B,) bool: through
    ``model.log_prob_terms`` where the model has it, else ``model.log_prob`` (none singular)."""
    terms_of = getattr(model, "log_prob_terms", None)
    singular = None
    if callable(terms_of):
        terms = terms_of(y)
        lp, singular = terms.log_prob, getattr(terms, "singular", None)
    else:
        lp = model.log_prob(y)
    lp = lp.reshape(-1).detach().to(torch.float64)
    if singular is None:
        return lp, torch.zeros(lp.shape, dtype=torch.bool, device=lp.device)
    return lp, singular.reshape(-1).to(lp.device, torch.bool)


def _model_pass(
    model: Any, x: Tensor, *, standardizer: Any, batch_size: int, recon: bool
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """In chunks: log p (B,) in data units, log p (B,) in model units, reconstructions (B, D)
    in data units (None unless ``recon``), and the singular samples (B,) bool (see the module
    docstring; their log p is not a density, NaN from a ``RectangularFlow``)."""
    log_p_data, log_p_model, recons, singulars = [], [], [], []
    with warnings.catch_warnings():
        # The model warns per call; the public functions warn once, counting every chunk.
        warnings.filterwarnings("ignore", message=SINGULAR_WARNING, category=RuntimeWarning)
        for xb in x.split(batch_size):
            y = xb if standardizer is None else standardizer.transform(xb)
            with torch.no_grad():
                lp, singular = _log_prob(model, y)
                log_p_model.append(lp)
                singulars.append(singular)
                if standardizer is not None:
                    lp = lp + _log_det_correction(model, y, standardizer).to(lp)
                log_p_data.append(lp)
                if recon:
                    r = model.reconstruct(y)
                    if standardizer is not None:
                        r = standardizer.inverse_transform(r)
                    recons.append(r.detach().to(xb))
    x_rec = torch.cat(recons) if recon else None
    return torch.cat(log_p_data), torch.cat(log_p_model), x_rec, torch.cat(singulars)


def _warn_singular(counts: str, consequence: str) -> None:
    """One warning that samples with a numerically singular JᵀJ were met: ``counts`` says how
    many of what, ``consequence`` what was done with them. It does not begin with
    ``SINGULAR_WARNING``, so a filter on the model's warnings leaves it."""
    warn_at_caller(
        f"{counts} have a numerically singular JᵀJ under the model (its decoder's Jacobian is "
        "rank deficient to the model's precision there), so their log det is rounding error, "
        f"not a density: {consequence}. A few are harmless; many mean the learned manifold "
        "has collapsed there."
    )


def data_log_prob(
    model: Any, x: Tensor, *, standardizer: Any = None, batch_size: int = 1024
) -> Tensor:
    """log p(x) per sample, in data units: the model's log_prob plus the standardiser's term.

    With a "global" standardiser (or d = D) the correction is d · (-log s); with per-feature
    scales on a manifold it needs the tangent space, taken from the model's Jacobian at
    encode(x) (d forward-mode tangents per chunk).

    Arguments:
        model: has ``log_prob``; with a standardiser also ``encode`` (or an int attribute
            ``d``), and ``encode`` and ``decode`` when its scales differ per feature.
        x: (B, D) data, in data units if ``standardizer`` is given, else in model units.
        standardizer: the fitted ``rnf_fast.data.Standardizer`` the model was trained behind.
        batch_size: rows per model call.
    Returns:
        (B,) float64 log densities (nats, w.r.t. d-dimensional volume on the manifold); NaN
        for the samples whose JᵀJ is numerically singular (from a ``RectangularFlow``, whose
        ``log_prob_terms(x).singular`` marks them), with one warning counting them.
    """
    _require(model, "log_prob")
    _check_samples("x", x)
    log_p, _, _, singular = _model_pass(
        model, x, standardizer=standardizer, batch_size=_check_batch_size(batch_size), recon=False
    )
    if bool(singular.any()):
        _warn_singular(
            f"{int(singular.sum())} of {len(x)} samples", "their log p is NaN (not averaged)"
        )
    return log_p


def _ood_pass(
    model: Any, x: Tensor, *, standardizer: Any, batch_size: int
) -> tuple[dict[str, Tensor], Tensor]:
    """The scores of :func:`ood_scores` and the singular samples (B,) bool."""
    _require(model, "log_prob", "reconstruct")
    _check_samples("x", x)
    log_p, _, x_rec, singular = _model_pass(
        model, x, standardizer=standardizer, batch_size=_check_batch_size(batch_size), recon=True
    )
    scores = {
        "nll": -log_p,
        "recon_error": reconstruction_error(x, x_rec, per_sample=True).to(torch.float64),
    }
    return scores, singular


def ood_scores(
    model: Any, x: Tensor, *, standardizer: Any = None, batch_size: int = 1024
) -> dict[str, Tensor]:
    """Per-sample out-of-distribution scores of x under a model; larger = more anomalous.

    Arguments:
        model: has ``log_prob`` and ``reconstruct`` (and ``encode``, ``decode`` with a
            standardiser).
        x: (B, D) samples (data units if ``standardizer`` is given).
    Returns:
        {"nll": (B,) -log p(x), "recon_error": (B,) per-sample mean squared error}, float64,
        both in data units. "nll" is NaN for the samples whose JᵀJ is numerically singular
        (one warning counts them; :func:`ood_auroc` leaves them out).
    """
    scores, singular = _ood_pass(model, x, standardizer=standardizer, batch_size=batch_size)
    if bool(singular.any()):
        _warn_singular(
            f"{int(singular.sum())} of {len(x)} samples", "their nll score is NaN (not a score)"
        )
    return scores


def ood_auroc(
    model: Any,
    x_in: Tensor,
    x_out: Tensor,
    *,
    standardizer: Any = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """AUROC of each :func:`ood_scores` score for telling x_out (positives) from x_in.

    The NLL AUROC leaves out the samples of either set whose JᵀJ is numerically singular
    (their NLL is no score; one warning counts them); NaN if a set has none left. The
    reconstruction AUROC uses every sample.

    Arguments:
        x_in: (N_in, D) held-out samples of the training distribution.
        x_out: (N_out, D) samples of another dataset, in the same units.
    Returns:
        {"nll": AUROC, "recon_error": AUROC}. Likelihood AUROCs below 0.5 are a known
        failure of likelihood-based OOD detection, reported as measured.
    """
    s_in, singular_in = _ood_pass(model, x_in, standardizer=standardizer, batch_size=batch_size)
    s_out, singular_out = _ood_pass(model, x_out, standardizer=standardizer, batch_size=batch_size)
    nll_in, nll_out = s_in["nll"][~singular_in], s_out["nll"][~singular_out]
    result = {
        "nll": auroc(nll_in, nll_out) if len(nll_in) and len(nll_out) else float("nan"),
        "recon_error": auroc(s_in["recon_error"], s_out["recon_error"]),
    }
    if bool(singular_in.any() or singular_out.any()):
        _warn_singular(
            f"{int(singular_in.sum())} of {len(x_in)} in-distribution and "
            f"{int(singular_out.sum())} of {len(x_out)} out-of-distribution samples",
            "they are left out of the NLL AUROC (the reconstruction AUROC uses them)",
        )
    return result


def _draw_samples(
    model: Any, n: int, *, batch_size: int, seed: int | None, device: torch.device
) -> Tensor:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        return torch.cat([model.sample(k).detach() for k in sizes])


def _mean_and_se(v: Tensor) -> tuple[float, float]:
    n = v.numel()
    se = float(v.std() / math.sqrt(n)) if n > 1 else float("nan")
    return float(v.mean()), se


def _known_density_metrics(
    dataset: Any,
    test_x: Tensor,
    x_rec: Tensor,
    samples: Tensor | None,
    nll: float,
    kept: Tensor,
) -> dict[str, float]:
    """What a dataset that knows its density says; ``kept`` (N,) bool: the test samples in
    ``nll``, on which the true NLL is taken too."""
    out: dict[str, float] = {}
    if getattr(dataset, "entropy", None) is not None:
        out["entropy"] = float(dataset.entropy)
        out["nll_gap"] = nll - out["entropy"]
    true_log_prob = getattr(dataset, "true_log_prob", None)
    if true_log_prob is not None:
        out["test_true_nll"] = (
            -float(true_log_prob(test_x[kept]).to(torch.float64).mean())
            if kept.any()
            else float("nan")
        )
        if samples is not None:
            out["sample_true_nll"] = -float(true_log_prob(samples).to(torch.float64).mean())
    project = getattr(dataset, "project", None)
    if project is not None:
        out["recon_manifold_distance"] = float((x_rec - project(x_rec)).norm(dim=1).mean())
        if samples is not None:
            out["sample_manifold_distance"] = float((samples - project(samples)).norm(dim=1).mean())
    return out


def evaluate(
    model: Any,
    test_x: Tensor,
    *,
    dataset: Any = None,
    standardizer: Any = None,
    n_samples: int | None = None,
    batch_size: int = 1024,
    seed: int | None = 0,
) -> dict[str, float]:
    """Test NLL beside reconstruction error and sample Fréchet distance (and the truth if known).

    Every number is in data units when a standardiser is given (test_x is then raw data, as in
    ``dataset.test``; the NLL gets the standardiser's log-volume correction, reconstructions and
    samples are mapped back before errors and distances are taken).

    Arguments:
        model: duck-typed flow with ``log_prob``, ``reconstruct``, ``sample`` (and ``encode``,
            ``decode`` when a per-feature standardiser is given).
        test_x: (N, D) test samples.
        dataset: optional ``rnf_fast.data.Dataset`` (or anything with ``entropy``,
            ``true_log_prob``, ``project``); what it knows is compared with the model.
        standardizer: the fitted ``Standardizer`` the model was trained behind, or None.
        n_samples: model samples for the Fréchet distance (default N; 0 skips sampling).
        batch_size: rows per model call.
        seed: seeds the model samples (the global RNG state is restored); None draws freely.
    Returns:
        A dict of floats:
        "nll", "nll_se" (mean test NLL in nats per sample and its standard error, over the
        test samples that are not singular), "singular" (test samples left out of every NLL
        number because the model's JᵀJ is numerically singular there: their log det is
        rounding error; a warning says so when there are any), "recon_error" (mean squared
        error per feature, every test sample), "frechet" (samples vs test_x),
        "nonfinite" (test samples, not singular, with a non-finite log p),
        "nonfinite_samples" (model samples left out of the distances for being non-finite),
        "n_test", "n_samples"; "nll_standardized" with a standardiser; with a dataset that
        knows them: "entropy", "nll_gap" (nll - entropy), "test_true_nll" (the true NLL of
        the test samples in "nll": the entropy's estimate on these same samples),
        "sample_true_nll", "recon_manifold_distance" and "sample_manifold_distance" (mean
        Euclidean distance to the true manifold).
    """
    _check_samples("test_x", test_x, min_rows=2)
    n_samples = test_x.shape[0] if n_samples is None else n_samples
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples == 1:
        raise ValueError(f"n_samples must be 0 or an int >= 2, got {n_samples!r}")
    if n_samples < 0:
        raise ValueError(f"n_samples must be 0 or an int >= 2, got {n_samples!r}")
    _require(model, "log_prob", "reconstruct", *(("sample",) if n_samples else ()))
    batch_size = _check_batch_size(batch_size)

    log_p, log_p_model, x_rec, singular = _model_pass(
        model, test_x, standardizer=standardizer, batch_size=batch_size, recon=True
    )
    kept = ~singular
    nll, nll_se = _mean_and_se(-log_p[kept])
    metrics: dict[str, float] = {
        "nll": nll,
        "nll_se": nll_se,
        "singular": float(singular.sum()),
        "recon_error": float(reconstruction_error(test_x, x_rec)),
    }
    samples = None
    if n_samples:
        samples = _draw_samples(
            model, n_samples, batch_size=batch_size, seed=seed, device=test_x.device
        )
        if standardizer is not None:
            samples = standardizer.inverse_transform(samples)
        # A sample that left the float range says so through "nonfinite_samples", not a NaN.
        samples = samples.to(test_x)
        finite = torch.isfinite(samples).all(1)
        samples = samples[finite]
        metrics["frechet"] = (
            frechet_distance(samples, test_x) if samples.shape[0] >= 2 else float("nan")
        )
        metrics["nonfinite_samples"] = float((~finite).sum())
    metrics["nonfinite"] = float((~torch.isfinite(log_p[kept])).sum())
    metrics["n_test"] = float(test_x.shape[0])
    metrics["n_samples"] = float(n_samples)
    if standardizer is not None:
        metrics["nll_standardized"] = -float(log_p_model[kept].mean())
    if dataset is not None:
        metrics.update(_known_density_metrics(dataset, test_x, x_rec, samples, nll, kept))
    if bool(singular.any()):
        _warn_singular(
            f"{int(singular.sum())} of {len(test_x)} test samples",
            "they are left out of the NLL numbers (nll, nll_se, nll_gap, test_true_nll, "
            "nll_standardized; counted in 'singular'); the reconstruction error and the "
            "distances use every sample",
        )
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """One line for a terminal: NLL always beside the reconstruction error (DESIGN.md §5).

    Example:
        >>> format_metrics({"nll": 1.63, "nll_se": 0.02, "recon_error": 2e-4, "entropy": 1.6274})
        'test NLL 1.6300 ± 0.0200 nats (true entropy 1.6274, gap +0.0026) | recon MSE 2.000e-04'
    """
    parts = []
    if "nll" in metrics:
        nll = f"test NLL {metrics['nll']:.4f}"
        if "nll_se" in metrics and math.isfinite(metrics["nll_se"]):
            nll += f" ± {metrics['nll_se']:.4f}"
        nll += " nats"
        if metrics.get("singular"):
            nll += f" ({metrics['singular']:.0f} singular samples left out)"
        if "entropy" in metrics:
            gap = metrics["nll"] - metrics["entropy"]
            nll += f" (true entropy {metrics['entropy']:.4f}, gap {gap:+.4f})"
        parts.append(nll)
    if "recon_error" in metrics:
        parts.append(f"recon MSE {metrics['recon_error']:.3e}")
    if "frechet" in metrics:
        parts.append(f"Fréchet {metrics['frechet']:.4g}")
    if "sample_manifold_distance" in metrics:
        parts.append(f"sample dist. to true manifold {metrics['sample_manifold_distance']:.3e}")
    return " | ".join(parts)
