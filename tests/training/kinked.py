"""A rectangular flow whose decoder is rank 1 on half of latent space: the problem of the tests
of singular samples in training (its singular samples are known without the engine)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rnf_fast.models import FlowConfig
from rnf_fast.testing import FoldedFlow

__all__ = ["Kinked", "per_epoch"]


class Kinked(FoldedFlow):
    """:class:`rnf_fast.testing.FoldedFlow` that keeps every encoding in ``encoded`` as
    (training mode, grad enabled, z): the trainer's steps encode with both on, its validation
    with neither, ActNorm's initialisation with grad off."""

    def __init__(self, config: FlowConfig | dict, *, threshold: float = 0.0) -> None:
        super().__init__(config, threshold=threshold)
        self.encoded: list[tuple[bool, bool, Tensor]] = []

    def encode(self, x: Tensor) -> Tensor:
        z = super().encode(x)
        self.encoded.append((self.training, torch.is_grad_enabled(), z.detach().clone()))
        return z

    def singular_counts(self) -> tuple[list[int], list[int]]:
        """The singular samples of each training step and of each validation, in call order."""
        steps, validations = [], []
        for training, grad, z in self.encoded:
            singular = int((z[:, 0] <= self.threshold).sum())
            if training and grad:
                steps.append(singular)
            elif not training:
                validations.append(singular)
        return steps, validations


def per_epoch(counts: list[int], epochs: int) -> list[int]:
    """counts of equal-sized epochs summed per epoch."""
    size = math.ceil(len(counts) / epochs)
    return [sum(counts[i : i + size]) for i in range(0, len(counts), size)]
