"""Evaluation of rectangular flows: metrics (NLL beside reconstruction error, Fréchet distance,
OOD AUROC), the image metrics (classifier Fréchet distance, logit-space NLL) and pictures
(learned manifolds, image grids, training curves).

Importing this package needs only torch and numpy; the plotting functions import matplotlib
when called (``pip install 'rnf_fast[plots]'``).
"""

from rnf_fast.evaluation.images import (
    DigitClassifier,
    classifier_frechet,
    image_metrics,
    logit_space_log_prob,
    train_classifier,
)
from rnf_fast.evaluation.metrics import (
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
from rnf_fast.evaluation.plots import (
    plot_image_grid,
    plot_manifold_2d,
    plot_manifold_3d,
    plot_manifold_projection,
    plot_samples_and_reconstructions,
    plot_training_curves,
)

__all__ = [
    "DigitClassifier",
    "auroc",
    "classifier_frechet",
    "data_log_prob",
    "evaluate",
    "format_metrics",
    "frechet_distance",
    "gaussian_frechet_distance",
    "image_metrics",
    "logit_space_log_prob",
    "ood_auroc",
    "ood_scores",
    "plot_image_grid",
    "plot_manifold_2d",
    "plot_manifold_3d",
    "plot_manifold_projection",
    "plot_samples_and_reconstructions",
    "plot_training_curves",
    "reconstruction_error",
    "train_classifier",
]
