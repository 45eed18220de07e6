"""Image-model evaluation offline: a small in-project digit classifier and its Fréchet distance,
the logit-space NLL of a model whose decoder ends with a logit layer, and out-of-distribution
scores against the other digit classes and against upsampled scikit-learn digits.

The classifier stands in for the Inception network of the FID, which cannot be downloaded here:
a two-layer CNN trained on the training split of the same MNIST subset (all ten classes); the
Fréchet distance is taken between Gaussians fitted to its 64-dimensional penultimate features.
It ranks models of this project against each other; its values are not comparable with
published FIDs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rnf_fast.engine.api import logdet
from rnf_fast.evaluation.metrics import frechet_distance, ood_auroc
from rnf_fast.flows.base import Compose, Inverse
from rnf_fast.flows.preprocess import Logit
from rnf_fast.linearize.flows import PaddedFlowDecoder

__all__ = [
    "CLASSIFIER_DEFAULTS",
    "DigitClassifier",
    "classifier_accuracy",
    "classifier_frechet",
    "image_metrics",
    "load_or_train_classifier",
    "logit_parts",
    "logit_space_log_prob",
    "train_classifier",
]

CLASSIFIER_DEFAULTS: dict[str, Any] = {"epochs": 8, "batch_size": 64, "lr": 1e-3, "seed": 0}
"""How the Fréchet classifier is trained: Adam, this many epochs over the training split."""


class DigitClassifier(nn.Module):
    """A small CNN on (B, 784) MNIST images with pixels in [0, 1]: logits (B, 10), features (B, 64).

    conv 3×3 (16) - ReLU - max-pool 2 - conv 3×3 (32) - ReLU - max-pool 2 - linear (64) - ReLU
    [the features] - linear (10).

    Arguments:
        image_shape: (C, H, W) of one image, H and W divisible by 4.
        num_classes: outputs.
    """

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        C, H, W = image_shape
        if H % 4 or W % 4:
            raise ValueError(f"image_shape must have H and W divisible by 4, got {image_shape}")
        self.image_shape = tuple(image_shape)
        self.conv1 = nn.Conv2d(C, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * (H // 4) * (W // 4), 64)
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features: x (B, C·H·W) -> (B, 64)."""
        h = x.reshape(x.shape[0], *self.image_shape)
        h = F.max_pool2d(F.relu(self.conv1(h)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: x (B, C·H·W) -> (B, num_classes)."""
        return self.head(self.features(x))


def train_classifier(
    x: Tensor,
    y: Tensor,
    *,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    epochs: int = CLASSIFIER_DEFAULTS["epochs"],
    batch_size: int = CLASSIFIER_DEFAULTS["batch_size"],
    lr: float = CLASSIFIER_DEFAULTS["lr"],
    seed: int = CLASSIFIER_DEFAULTS["seed"],
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` with Adam and cross-entropy, seeded.

    Arguments:
        x: (N, C·H·W) training images, pixels in [0, 1].
        y: (N,) integer labels in 0..9.
        epochs, batch_size, lr: of the Adam loop over seeded shuffles.
        seed: seeds the initial weights and the batch order.

    Returns:
        The trained classifier in eval mode.
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != math.prod(image_shape):
        raise ValueError(f"x must be (N, {math.prod(image_shape)}), got {getattr(x, 'shape', x)}")
    if not isinstance(y, Tensor) or tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y must be ({x.shape[0]},) labels, got {getattr(y, 'shape', y)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = DigitClassifier(image_shape).to(x.dtype)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    order_gen = torch.Generator().manual_seed(seed)
    clf.train()
    for _ in range(epochs):
        for index in torch.randperm(x.shape[0], generator=order_gen).split(batch_size):
            loss = F.cross_entropy(clf(x[index]), y[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return clf.eval()


@torch.no_grad()
def classifier_accuracy(clf: DigitClassifier, x: Tensor, y: Tensor) -> float:
    """Fraction of x (N, D) whose arg-max class is y (N,)."""
    return float((clf(x.to(next(clf.parameters()).dtype)).argmax(1) == y).double().mean())


@torch.no_grad()
def classifier_frechet(clf: DigitClassifier, x: Tensor, y: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the classifier features of x and y.

    Arguments:
        clf: the feature extractor.
        x: (N, D) images, N >= 2; y: (M, D) images, M >= 2.

    Returns:
        The distance (float, >= 0); 0 for identical sets.
    """
    dtype = next(clf.parameters()).dtype
    return frechet_distance(clf.features(x.to(dtype)), clf.features(y.to(dtype)))


def load_or_train_classifier(
    path: str | os.PathLike, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]
) -> tuple[DigitClassifier, dict[str, Any]]:
    """The classifier cached at ``path``, or a new one trained (``CLASSIFIER_DEFAULTS``) and saved.

    Arguments:
        path: the cache file (weights and how they were trained).
        train: (images (N, D), labels (N,)) to train on.
        test: (images (M, D), labels (M,)) for the reported accuracy.

    Returns:
        (classifier, info) with info = the training options, ``n_train``, ``n_test`` and
        ``test_accuracy``.
    """
    path = Path(path)
    expected = {**CLASSIFIER_DEFAULTS, "n_train": int(train[0].shape[0])}
    if path.exists():
        payload = torch.load(path, weights_only=True)
        if {k: payload["info"].get(k) for k in expected} == expected:
            clf = DigitClassifier(tuple(payload["image_shape"])).to(train[0].dtype)
            clf.load_state_dict(payload["state_dict"])
            return clf.eval(), dict(payload["info"])
    clf = train_classifier(*train, **CLASSIFIER_DEFAULTS)
    info = {
        **expected,
        "n_test": int(test[0].shape[0]),
        "test_accuracy": classifier_accuracy(clf, *test),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {"state_dict": clf.state_dict(), "image_shape": list(clf.image_shape), "info": info}, tmp
    )
    os.replace(tmp, path)
    return clf, info


def logit_parts(model: Any) -> tuple[Logit, nn.Module] | None:
    """(logit layer, core flow) when model.f is ``Inverse(Compose(Logit, core...))``, else None.

    That is the layout of ``rnf_fast.flows.builders.image_decoder`` with a logit layer: the
    decoder is f(y) = logit⁻¹(core⁻¹(y)).
    """
    f = getattr(model, "f", None)
    if not isinstance(f, Inverse) or not isinstance(f.layer, Compose):
        return None
    layers = list(f.layer.layers)
    if len(layers) < 2 or not isinstance(layers[0], Logit):
        return None
    return layers[0], Compose(*layers[1:])


@torch.no_grad()
def logit_space_log_prob(model: Any, x: Tensor, *, chunk_size: int = 256) -> Tensor:
    """log p of the logit-space points logit(x) under the same model without its last layer.

    The density the rectangular-flows paper reports for images: the manifold lives in logit
    space, g_logit = core⁻¹ ∘ pad, log p = log p_Z(z) - ½ log det(J_logitᵀ J_logit) with the same
    z = g†(x). It differs from the pixel-space density on the manifold by the change of
    d-dimensional volume of the sigmoid along the manifold, not by a per-pixel sum.

    Arguments:
        model: a ``RectangularFlow`` whose f has the layout of :func:`logit_parts`.
        x: (B, D) pixels in [0, 1].
        chunk_size: rows per exact log det.

    Returns:
        (B,) log densities in nats (w.r.t. d-dimensional volume in logit space); NaN where
        J_logitᵀ J_logit is numerically singular (the engine warns, counting them).
    """
    parts = logit_parts(model)
    if parts is None:
        raise ValueError("model.f has no logit layer (expected Inverse(Compose(Logit, ...)))")
    _, core = parts
    # The padding of RectangularFlow.decode, followed by f without its final logit⁻¹, with the
    # explicit linearization of the same layers.
    decode_logit = PaddedFlowDecoder((model.pad_permutation, Inverse(core)), D=model.D)
    out = []
    for chunk in x.split(chunk_size):
        z = model.encode(chunk)
        ld = logdet(decode_logit, z, method="exact", on_singular="nan")
        out.append(model.latent_log_prob(z) - 0.5 * ld)
    return torch.cat(out)


def _finite_rows(x: Tensor) -> Tensor:
    return x[torch.isfinite(x).all(1)]


def image_metrics(
    model: Any,
    test_x: Tensor,
    *,
    classifier: DigitClassifier | None = None,
    reference_x: Tensor | None = None,
    ood: dict[str, Tensor] | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """The image-specific numbers of a trained model, all in pixel units [0, 1].

    Arguments:
        model: a ``RectangularFlow`` on flat images (B, D).
        test_x: (N, D) dequantised test images of the training classes.
        classifier: the Fréchet feature extractor; None skips the classifier distance.
        reference_x: (M, D) other images of the training distribution (e.g. the training
            split): their distance to test_x is the floor of each Fréchet distance at this
            sample size.
        ood: {name: (K, D) out-of-distribution images}; each is scored against test_x.
        n_samples: model samples for the Fréchet distances (default N).
        seed: seeds the samples.
        batch_size: rows per model call.

    Returns:
        ``nll_logit`` (mean logit-space NLL, with a logit layer, over the samples whose
        Jacobian is not singular; ``nll_logit_singular`` counts the others), ``frechet_pixel``,
        ``frechet_classifier``, ``nonfinite_samples``; with ``reference_x``:
        ``frechet_pixel_reference``, ``frechet_classifier_reference``; per OOD set NAME:
        ``auroc_nll_NAME`` and ``auroc_recon_NAME`` (out-of-distribution as positives).
    """
    out: dict[str, float] = {}
    if logit_parts(model) is not None:
        # Singular samples (NaN) are left out of the mean, as from the pixel-space NLL.
        log_p = logit_space_log_prob(model, test_x, chunk_size=batch_size).double()
        out["nll_logit"] = -float(log_p.nanmean())
        out["nll_logit_singular"] = float(log_p.isnan().sum())
    n = test_x.shape[0] if n_samples is None else n_samples
    with torch.no_grad():
        samples = model.sample(n, generator=torch.Generator().manual_seed(seed))
    finite = _finite_rows(samples)
    out["nonfinite_samples"] = float(n - finite.shape[0])
    out["frechet_pixel"] = frechet_distance(finite, test_x)
    if classifier is not None:
        out["frechet_classifier"] = classifier_frechet(classifier, finite, test_x)
    if reference_x is not None:
        ref = reference_x[:n]
        out["frechet_pixel_reference"] = frechet_distance(ref, test_x)
        if classifier is not None:
            out["frechet_classifier_reference"] = classifier_frechet(classifier, ref, test_x)
    for name, x_out in (ood or {}).items():
        scores = ood_auroc(model, test_x, x_out, batch_size=batch_size)
        out[f"auroc_nll_{name}"] = scores["nll"]
        out[f"auroc_recon_{name}"] = scores["recon_error"]
    return out
