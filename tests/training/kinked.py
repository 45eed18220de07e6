"""A rectangular flow whose decoder is rank 1 on half of latent space: the problem of the tests
of singular samples in training (its singular samples are known without the engine)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rnf_fast.models import FlowConfig, RectangularFlow

__all__ = ["Kinked", "per_epoch"]


class Kinked(RectangularFlow):
    """g(z) = f(pad(φ(z))) with φ(z) = z where z_1 > ``threshold`` and (t, t), t = z_1 + 2 z_2,
    elsewhere (d = 2): there J = J_f [u, 2u] (u = (1, 1) padded) has rank 1, so JᵀJ is singular
    however the flow f is trained; elsewhere J = J_f on the first two coordinates, full rank.
    ``threshold = inf`` makes every sample singular.

    The decoder is a plain function (the engine's generic path), and every encoding is kept in
    ``encoded`` as (training mode, grad enabled, z): the trainer's steps encode with both on,
    its validation with neither, ActNorm's initialisation with grad off.
    """

    def __init__(self, config: FlowConfig | dict, *, threshold: float = 0.0) -> None:
        super().__init__(config)
        self.threshold = threshold
        self.encoded: list[tuple[bool, bool, Tensor]] = []

    def encode(self, x: Tensor) -> Tensor:
        z = super().encode(x)
        self.encoded.append((self.training, torch.is_grad_enabled(), z.detach().clone()))
        return z

    def decode(self, z: Tensor) -> Tensor:
        t = z[:, :1] + 2.0 * z[:, 1:2]
        return super().decode(torch.where(z[:, :1] > self.threshold, z, torch.cat([t, t], 1)))

    @property
    def decoder(self):  # the generic path: no explicit linearization of φ
        return self.decode

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
