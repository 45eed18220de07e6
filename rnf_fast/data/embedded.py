"""Known densities on low-dimensional manifolds placed in a high-dimensional R^D by an isometry.

x = Q y, where y lies on a base manifold in R^m (circle, sphere, flat torus) and Q (D, m) has
orthonormal columns (a seeded QR of a Gaussian matrix). Q preserves lengths, hence d-dimensional
volume: the density on the embedded manifold at Q y equals the base density at y, and the entropy
is unchanged. The nearest point of the embedded manifold to any x is Q · project_base(Qᵀ x).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rnf_fast.data.registry import Dataset, Split
from rnf_fast.data.synthetic import ManifoldDistribution, VonMises, VonMisesFisher, sample_dataset

__all__ = [
    "Embedded",
    "random_isometry",
    "make_embedded",
    "make_embedded_circle",
    "make_embedded_sphere",
    "make_embedded_torus",
]


def random_isometry(D: int, m: int, *, seed: int = 0) -> Tensor:
    """Returns Q (D, m), float64, with orthonormal columns: QR of a seeded Gaussian, signs fixed.

    Fixing sign(diag R) > 0 makes Q a deterministic function of the seed (and Haar-distributed).
    """
    if not 1 <= m <= D:
        raise ValueError(f"need 1 <= m <= D for an isometry R^m -> R^D, got m = {m}, D = {D}")
    G = np.random.default_rng(seed).standard_normal((D, m))
    Q, R = np.linalg.qr(G)
    return torch.from_numpy(Q * np.sign(np.diag(R)))


class Embedded:
    """A `ManifoldDistribution` in R^m pushed into R^D by a random isometry x = Q y.

    Arguments:
        base: the distribution on the base manifold (d, m = base.D).
        D: ambient dimension, >= base.D.
        seed: seed of the isometry (independent of the sampling seed).
    Attributes:
        isometry: Q (D, m), float64, QᵀQ = I.
    """

    def __init__(self, base: ManifoldDistribution, *, D: int, seed: int = 0) -> None:
        if isinstance(D, bool) or not isinstance(D, int) or D < base.D:
            raise ValueError(f"D must be an int >= {base.D} (the base dimension), got {D!r}")
        self.base = base
        self.d = base.d
        self.D = D
        self.isometry = random_isometry(D, base.D, seed=seed)

    @property
    def entropy(self) -> float:
        """Entropy of the base density (an isometry preserves it)."""
        return self.base.entropy

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.D:
            raise ValueError(f"x must be (B, {self.D}), got {tuple(x.shape)}")

    def sample(self, n: int, *, rng: np.random.Generator) -> Tensor:
        """Draws n points (n, D) in float64."""
        return self.base.sample(n, rng=rng) @ self.isometry.T

    def project(self, x: Tensor) -> Tensor:
        """Nearest manifold point (B, D) of x (B, D)."""
        self._check(x)
        Q = self.isometry.to(x)
        return self.base.project(x @ Q) @ Q.T

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density (B,) w.r.t. d-volume at the nearest manifold point of x (B, D)."""
        self._check(x)
        return self.base.log_prob(x @ self.isometry.to(x))


def make_embedded(
    base: ManifoldDistribution,
    *,
    D: int,
    name: str,
    embedding_seed: int = 0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Samples `base` embedded in R^D into a `Dataset`; info["isometry"] is Q (D, base.D)."""
    split = Split(n_train, n_val, n_test, seed, dtype)
    return _embedded_dataset(base, D, name, embedding_seed, split)


def _embedded_dataset(
    base: ManifoldDistribution, D: int, name: str, embedding_seed: int, split: Split
) -> Dataset:
    dist = Embedded(base, D=D, seed=embedding_seed)
    info = {"isometry": dist.isometry, "embedding_seed": embedding_seed}
    return sample_dataset(dist, name, split, info=info)


def make_embedded_circle(
    *,
    D: int = 32,
    kappa: float = 1.0,
    embedding_seed: int = 0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Von Mises(0, kappa) circle in R^D (d = 1); entropy 1.6274 nats at kappa = 1."""
    split = Split(n_train, n_val, n_test, seed, dtype)
    return _embedded_dataset(VonMises(kappa), D, "embedded-circle", embedding_seed, split)


def make_embedded_sphere(
    *,
    D: int = 32,
    kappa: float = 1.0,
    mean_direction: Sequence[float] | None = None,
    embedding_seed: int = 0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Von Mises–Fisher sphere S² in R^D (d = 2)."""
    base = VonMisesFisher(kappa, mean_direction)
    split = Split(n_train, n_val, n_test, seed, dtype)
    return _embedded_dataset(base, D, "embedded-sphere", embedding_seed, split)


def make_embedded_torus(
    *,
    d: int = 2,
    D: int = 32,
    kappa: float = 1.0,
    embedding_seed: int = 0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """d independent von Mises(0, kappa) angles on the flat torus (S¹)^d, in R^D (needs D >= 2d)."""
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    split = Split(n_train, n_val, n_test, seed, dtype)
    return _embedded_dataset(VonMises([kappa] * d), D, "embedded-torus", embedding_seed, split)
