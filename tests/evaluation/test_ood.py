"""Image evaluation: the classifier Fréchet distance, the logit-space NLL, OOD scores, and the
upsampled scikit-learn digits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacfwd

from rnf_fast.evaluation import auroc, frechet_distance, gaussian_frechet_distance
from rnf_fast.evaluation.images import (
    DigitClassifier,
    classifier_accuracy,
    classifier_frechet,
    image_metrics,
    load_or_train_classifier,
    logit_parts,
    logit_space_log_prob,
    train_classifier,
)
from rnf_fast.models import RectangularFlow

from .test_metrics import pairwise_auroc

DTYPE = torch.float64


def tiny_model(alpha: float | None = 0.05) -> RectangularFlow:
    """A rectangular flow on 1×4×4 images with random (non-identity) weights, float64, eval."""
    model = RectangularFlow(
        {
            "D": 16,
            "d": 3,
            "image_shape": (1, 4, 4),
            "image_scales": 2,
            "image_blocks": 1,
            "image_channels": 4,
            "image_res_blocks": 1,
            "logit_alpha": alpha,
            "h_layers": 2,
            "h_hidden": (8,),
        }
    ).to(DTYPE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=generator, dtype=DTYPE))
    return model.eval()


def pixels(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 16, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def test_logit_space_log_prob_against_a_dense_jacobian():
    model = tiny_model()
    logit, core = logit_parts(model)
    x = pixels(3)
    z = model.encode(x)

    def decode_logit(v):
        padded = torch.cat([v, v.new_zeros(model.D - model.d)])
        y, _ = model.pad_permutation(padded[None])
        return core.inverse(y)[0][0]

    expected = []
    for b in range(3):
        J = jacfwd(decode_logit)(z[b])
        log_pz = model.latent_log_prob(z[b : b + 1])[0]
        expected.append(log_pz - 0.5 * torch.linalg.slogdet(J.mT @ J)[1])
    torch.testing.assert_close(
        logit_space_log_prob(model, x), torch.stack(expected), rtol=1e-8, atol=1e-8
    )


def test_pixel_and_logit_densities_differ_by_the_sigmoid_volume_on_the_manifold():
    model = tiny_model()
    logit, core = logit_parts(model)
    x = pixels(2)
    z = model.encode(x)
    J = torch.stack([jacfwd(lambda v: model.decode(v[None])[0])(z[b]) for b in range(2)])
    y = logit(model.decode(z))[0]
    # dx/dy of the logit's inverse, per pixel.
    s = torch.sigmoid(y) * torch.sigmoid(-y) / (1 - 2 * logit.alpha)
    J_logit = J / s[:, :, None]
    pixel_gap = model.log_prob(x) - logit_space_log_prob(model, x)
    expected = -0.5 * (
        torch.linalg.slogdet(J.mT @ J)[1] - torch.linalg.slogdet(J_logit.mT @ J_logit)[1]
    )
    torch.testing.assert_close(pixel_gap, expected, rtol=1e-7, atol=1e-7)
    # The gap is not the per-pixel sum Σ log s of a full-dimensional density.
    assert not torch.allclose(pixel_gap, s.log().sum(1), atol=1e-3)


def test_logit_parts_needs_a_logit_layer():
    assert logit_parts(tiny_model(None)) is None
    assert logit_parts(object()) is None
    with pytest.raises(ValueError, match="no logit layer"):
        logit_space_log_prob(tiny_model(None), pixels(2))


def test_classifier_learns_separable_images():
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 2
    x = 0.1 * torch.rand(40, 1, 8, 8, generator=generator)
    x[y == 1, :, :4] += 0.8  # class 1: bright top half
    x = x.flatten(1)
    clf = train_classifier(x, y, image_shape=(1, 8, 8), epochs=30, batch_size=8, lr=3e-3)
    assert classifier_accuracy(clf, x, y) == 1.0
    assert clf.features(x).shape == (40, 64)
    assert classifier_frechet(clf, x, x) == pytest.approx(0.0, abs=1e-8)
    assert classifier_frechet(clf, x[y == 0], x[y == 1]) > 0.1


def test_load_or_train_classifier_reuses_the_cache(tmp_path, monkeypatch):
    import rnf_fast.evaluation.images as images

    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 784, generator=generator), torch.arange(20) % 10
    test = torch.rand(30, 784, generator=generator), torch.arange(30) % 10
    monkeypatch.setitem(images.CLASSIFIER_DEFAULTS, "epochs", 1)
    path = tmp_path / "clf.pt"
    clf, info = load_or_train_classifier(path, (x, y), test)
    assert path.exists() and info["n_train"] == 20 and info["n_test"] == 30
    # The accuracy on the test pair (not on the training images), counted here.
    with torch.no_grad():
        correct = (clf(test[0]).argmax(1) == test[1]).sum().item()
    assert info["test_accuracy"] == pytest.approx(correct / 30, abs=1e-12)
    again, info2 = load_or_train_classifier(path, (x, y), test)
    assert info2 == info
    for a, b in zip(clf.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_classifier_bad_input():
    with pytest.raises(ValueError, match="x must be"):
        train_classifier(torch.zeros(4, 10), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must be"):
        train_classifier(torch.zeros(4, 784), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(torch.zeros(4, 784), torch.zeros(4, dtype=torch.int64), epochs=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        DigitClassifier((1, 6, 6))


def test_frechet_on_known_gaussians_equals_the_closed_form():
    # N(0, diag(a)) against N(m, diag(b)): ‖m‖² + Σ (√a - √b)².
    a, b, m = torch.tensor([1.0, 4.0]), torch.tensor([9.0, 1.0]), torch.tensor([1.0, -2.0])
    closed = float((m**2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    value = gaussian_frechet_distance(torch.zeros(2), torch.diag(a), m, torch.diag(b))
    assert value == pytest.approx(closed, rel=1e-12)
    # Samples whitened to exact moments give the same value.
    generator = torch.Generator().manual_seed(0)
    e = torch.randn(400, 2, generator=generator, dtype=DTYPE)
    e = e - e.mean(0)
    e = e @ torch.linalg.inv(torch.linalg.cholesky(e.mT @ e / 399)).mT
    x, y = e * a.sqrt().to(DTYPE), e * b.sqrt().to(DTYPE) + m.to(DTYPE)
    assert frechet_distance(x, y) == pytest.approx(closed, rel=1e-9)


def test_auroc_on_a_constructed_case():
    # in: 0..9, out: 5..14. Out scores 10..14 beat all 10 in-scores (50 pairs); out score
    # 5 + k (k = 0..4) beats 5 + k in-scores and ties one (5.5 + ... + 9.5 = 37.5 pairs).
    s_in, s_out = torch.arange(10.0), torch.arange(5.0, 15.0)
    assert auroc(s_in, s_out) == pytest.approx((50 + 37.5) / 100, abs=1e-12)
    assert auroc(s_out, s_in) == pytest.approx(1 - 0.875, abs=1e-12)


def test_image_metrics_scores_ood_sets_and_the_reference():
    model = tiny_model()
    test_x = pixels(12)
    far = (0.9 + 0.1 * pixels(10, seed=5)).clamp(max=0.999)
    reference = pixels(12, seed=2)
    out = image_metrics(model, test_x, reference_x=reference, ood={"far": far}, seed=0)
    for key in ("nll_logit", "frechet_pixel", "frechet_pixel_reference", "auroc_nll_far"):
        assert math.isfinite(out[key]), key
    expected_nll = -float(logit_space_log_prob(model, test_x).mean())
    assert out["nll_logit"] == pytest.approx(expected_nll, rel=1e-12)
    assert out["frechet_pixel_reference"] == pytest.approx(
        frechet_distance(reference, test_x), rel=1e-12
    )
    # Each OOD AUROC against the pairwise count of its per-sample score, "far" as positives.
    with torch.no_grad():
        nll_in, nll_far = -model.log_prob(test_x), -model.log_prob(far)
        recon_in = (test_x - model.reconstruct(test_x)).square().mean(1)
        recon_far = (far - model.reconstruct(far)).square().mean(1)
    assert out["auroc_nll_far"] == pytest.approx(pairwise_auroc(nll_in, nll_far), abs=1e-12)
    assert out["auroc_recon_far"] == pytest.approx(pairwise_auroc(recon_in, recon_far), abs=1e-12)
    assert out["nonfinite_samples"] == 0
    assert "frechet_classifier" not in out


def test_digits_as_mnist_frames_the_digits_like_mnist():
    pytest.importorskip("sklearn")
    from rnf_fast.data.images import digits_as_mnist

    x, y = digits_as_mnist()
    assert x.shape == (1797, 784) and y.shape == (1797,) and set(y.tolist()) == set(range(10))
    images = x.reshape(-1, 28, 28)
    assert float(images[:, :4].abs().max()) == 0 and float(images[:, :, -4:].abs().max()) == 0
    assert float(x.min()) >= 0 and float(x.max()) < 1
    torch.testing.assert_close(x * 256, torch.round(x * 256))  # 256 levels, lower corners
    with pytest.raises(ValueError, match="size"):
        digits_as_mnist(size=0)
