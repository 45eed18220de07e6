"""Known densities on known manifolds: von Mises on circles and tori, von Mises–Fisher on S².

Each distribution object gives `d`, `D`, `sample(n, rng=...)`, `log_prob(x)` (density w.r.t.
d-dimensional volume on the manifold, at the nearest manifold point), `project(x)` (that nearest
point) and the exact `entropy` in nats. `make_*` functions turn them into seeded `Dataset`s.

The checks these data exist for (DESIGN.md §5): a trained model's test NLL should approach
`entropy` (1.6274 nats for the von Mises circle at kappa = 1) while its reconstruction error stays
small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from rnf_fast.checks import check_rows
from rnf_fast.data.registry import Dataset, Split

__all__ = [
    "ManifoldDistribution",
    "VonMises",
    "VonMisesFisher",
    "make_manifold_dataset",
    "sample_dataset",
    "make_von_mises",
    "make_von_mises_torus",
    "make_vmf_sphere",
]


class ManifoldDistribution(Protocol):
    """What `make_manifold_dataset` and `Embedded` need from a distribution on a manifold."""

    d: int
    D: int

    @property
    def entropy(self) -> float: ...

    def sample(self, n: int, *, rng: np.random.Generator) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...

    def project(self, x: Tensor) -> Tensor: ...


def _as_vector(value: float | Sequence[float], what: str) -> np.ndarray:
    v = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if v.ndim != 1 or v.size == 0 or not np.all(np.isfinite(v)):
        raise ValueError(f"{what} must be a finite number or a non-empty sequence, got {value!r}")
    return v


class VonMises:
    """k independent von Mises angles on the flat torus (S¹)^k in R^(2k); k = 1: the unit circle.

    θ_i ~ VM(mu_i, kappa_i) and x = (cos θ_1, sin θ_1, ..., cos θ_k, sin θ_k). The map θ -> x
    has orthonormal Jacobian columns, so d-volume is dθ (d = k) and the density on the manifold is
    the product of the von Mises densities exp(kappa cos(θ - mu)) / (2π I0(kappa)).

    Arguments:
        kappa: concentration(s) >= 0, a number (k = 1) or a sequence of k numbers.
        mu: mean angle(s), broadcast against kappa.

    Example:
        >>> round(VonMises(1.0).entropy, 4)
        1.6274
    """

    def __init__(
        self, kappa: float | Sequence[float] = 1.0, mu: float | Sequence[float] = 0.0
    ) -> None:
        k = _as_vector(kappa, "kappa")
        m = _as_vector(mu, "mu")
        if np.any(k < 0):
            raise ValueError(f"kappa must be >= 0, got {kappa!r}")
        try:
            k, m = np.broadcast_arrays(k, m)
        except ValueError:
            raise ValueError(f"mu {mu!r} does not broadcast against kappa {kappa!r}") from None
        self.kappa = torch.from_numpy(k.copy())
        self.mu = torch.from_numpy(m.copy())
        self.d = k.size
        self.D = 2 * k.size

    def _log_norm(self) -> Tensor:
        # log(2π I0(κ)) with I0(κ) = i0e(κ) e^κ, stable for large κ
        return math.log(2 * math.pi) + torch.special.i0e(self.kappa).log() + self.kappa

    @property
    def entropy(self) -> float:
        """Σ_i [log(2π I0(κ_i)) - κ_i I1(κ_i)/I0(κ_i)] nats."""
        ratio = torch.special.i1e(self.kappa) / torch.special.i0e(self.kappa)
        return float((self._log_norm() - self.kappa * ratio).sum())

    def sample(self, n: int, *, rng: np.random.Generator) -> Tensor:
        """Draws n points (n, D) in float64 with numpy's von Mises sampler."""
        theta = rng.vonmises(self.mu.numpy(), self.kappa.numpy(), size=(n, self.d))
        x = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
        return torch.from_numpy(x.reshape(n, self.D))

    def project(self, x: Tensor) -> Tensor:
        """Nearest torus point (B, D) of x (B, D): each (x_2i, x_2i+1) pair scaled to length 1."""
        check_rows("x", x, self.D, rows="B", min_rows=0, finite=False)
        pairs = x.reshape(x.shape[0], self.d, 2)
        return (pairs / pairs.norm(dim=-1, keepdim=True)).reshape_as(x)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density (B,) w.r.t. d-volume at the nearest torus point of x (B, D)."""
        pairs = self.project(x).reshape(x.shape[0], self.d, 2)
        cos_dev = pairs[..., 0] * self.mu.to(x).cos() + pairs[..., 1] * self.mu.to(x).sin()
        return (self.kappa.to(x) * cos_dev - self._log_norm().to(x)).sum(-1)


class VonMisesFisher:
    """Von Mises–Fisher density C(κ) exp(κ μᵀx) on the unit sphere S² in R³ (d = 2, D = 3).

    C(κ) = κ / (4π sinh κ) (1/(4π) at κ = 0), w.r.t. surface area. Entropy -log C - κ A(κ) with
    A(κ) = coth κ - 1/κ = E[μᵀx]. Sampling is exact: the cosine w = μᵀx has the closed-form
    inverse CDF w = 1 + log(u + (1 - u) e^(-2κ)) / κ, the azimuth is uniform.

    Arguments:
        kappa: concentration >= 0.
        mean_direction: μ (3,), normalised here; default the north pole (0, 0, 1).
    """

    d = 2
    D = 3

    def __init__(self, kappa: float = 1.0, mean_direction: Sequence[float] | None = None) -> None:
        if not (math.isfinite(kappa) and kappa >= 0):
            raise ValueError(f"kappa must be a finite number >= 0, got {kappa!r}")
        mu = np.array(
            [0.0, 0.0, 1.0] if mean_direction is None else mean_direction, dtype=np.float64
        )
        if mu.shape != (3,) or not np.linalg.norm(mu) > 0:
            raise ValueError(f"mean_direction must be a non-zero 3-vector, got {mean_direction!r}")
        self.kappa = float(kappa)
        self.mean_direction = torch.from_numpy(mu / np.linalg.norm(mu))

    def _log_normalizer(self) -> float:
        k = self.kappa
        if k == 0:
            return -math.log(4 * math.pi)
        log_sinh = k + math.log(-math.expm1(-2 * k)) - math.log(2)
        return math.log(k) - math.log(4 * math.pi) - log_sinh

    def mean_resultant(self) -> float:
        """A(κ) = E[μᵀx] = coth κ - 1/κ (series κ/3 - κ³/45 near 0)."""
        k = self.kappa
        return k / 3 - k**3 / 45 if k < 1e-3 else 1 / math.tanh(k) - 1 / k

    @property
    def entropy(self) -> float:
        """-log C(κ) - κ A(κ) nats; log(4π) at κ = 0."""
        return -self._log_normalizer() - self.kappa * self.mean_resultant()

    def _rotation(self) -> np.ndarray:
        """Householder reflection taking the north pole e3 to μ (the vMF is symmetric about μ)."""
        mu = self.mean_direction.numpy()
        v = np.array([0.0, 0.0, 1.0]) - mu
        if np.linalg.norm(v) < 1e-12:
            return np.eye(3)
        return np.eye(3) - 2 * np.outer(v, v) / (v @ v)

    def sample(self, n: int, *, rng: np.random.Generator) -> Tensor:
        """Draws n points (n, 3) in float64."""
        u = rng.random(n)
        k = self.kappa
        w = 2 * u - 1 if k == 0 else 1 + np.log(u + (1 - u) * math.exp(-2 * k)) / k
        phi = rng.uniform(0, 2 * math.pi, size=n)
        r = np.sqrt(np.clip(1 - w**2, 0, None))
        x = np.stack([r * np.cos(phi), r * np.sin(phi), w], axis=1)
        return torch.from_numpy(x @ self._rotation().T)

    def project(self, x: Tensor) -> Tensor:
        """Nearest sphere point x / ‖x‖ (B, 3) of x (B, 3)."""
        check_rows("x", x, self.D, rows="B", min_rows=0, finite=False)
        return x / x.norm(dim=-1, keepdim=True)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density (B,) w.r.t. area at the nearest sphere point of x (B, 3)."""
        cos = self.project(x) @ self.mean_direction.to(x)
        return self.kappa * cos + self._log_normalizer()


def _check_counts(n_train: int, n_val: int, n_test: int) -> None:
    for what, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < (1 if what == "n_train" else 0):
            raise ValueError(f"{what} must be an int >= {1 if what == 'n_train' else 0}, got {n!r}")


def make_manifold_dataset(
    dist: ManifoldDistribution,
    *,
    name: str,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    info: dict | None = None,
) -> Dataset:
    """Samples n_train + n_val + n_test points (seeded) of `dist` into a `Dataset`.

    The Dataset carries d, the exact entropy, and true_log_prob / project from `dist`; they work
    in any float dtype (use float64 for accuracy checks). `info["distribution"]` is `dist`.
    """
    return sample_dataset(dist, name, Split(n_train, n_val, n_test, seed, dtype), info=info)


def sample_dataset(
    dist: ManifoldDistribution, name: str, split: Split, *, info: dict | None = None
) -> Dataset:
    """`make_manifold_dataset` with its split options in one `Split` (counts n_train >= 1,
    n_val, n_test >= 0; the sampler's seed; the dtype)."""
    n_train, n_val, n_test, seed = split.n_train, split.n_val, split.n_test, split.seed
    _check_counts(n_train, n_val, n_test)
    x = dist.sample(n_train + n_val + n_test, rng=np.random.default_rng(seed)).to(split.dtype)
    train, val, test = (t.clone() for t in x.split([n_train, n_val, n_test]))
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=test,
        d=dist.d,
        true_log_prob=dist.log_prob,
        entropy=dist.entropy,
        project=dist.project,
        info={"distribution": dist, "seed": seed, **(info or {})},
    )


def make_von_mises(
    *,
    kappa: float = 1.0,
    mu: float = 0.0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Von Mises(mu, kappa) on the unit circle in R² (d = 1, D = 2); entropy 1.6274 at kappa = 1."""
    split = Split(n_train, n_val, n_test, seed, dtype)
    return sample_dataset(VonMises(kappa, mu), "vonmises", split)


def make_von_mises_torus(
    *,
    d: int = 2,
    kappa: float | Sequence[float] = 1.0,
    mu: float | Sequence[float] = 0.0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """d independent von Mises angles on the flat torus (S¹)^d in R^(2d).

    Entropy d · 1.6274 nats at kappa = 1. kappa and mu: numbers (shared) or length-d sequences.
    """
    if isinstance(d, bool) or not isinstance(d, int) or d < 1:
        raise ValueError(f"d must be an int >= 1, got {d!r}")
    kappas, mus = _as_vector(kappa, "kappa"), _as_vector(mu, "mu")
    for what, v in (("kappa", kappas), ("mu", mus)):
        if v.size not in (1, d):
            raise ValueError(
                f"{what} must be a number or a sequence of length d = {d}, got {v.size}"
            )
    dist = VonMises(np.broadcast_to(kappas, d), np.broadcast_to(mus, d))
    return sample_dataset(dist, "vonmises-torus", Split(n_train, n_val, n_test, seed, dtype))


def make_vmf_sphere(
    *,
    kappa: float = 1.0,
    mean_direction: Sequence[float] | None = None,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 2_000,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Von Mises–Fisher(mean_direction, kappa) on the sphere S² in R³ (d = 2, D = 3)."""
    dist = VonMisesFisher(kappa, mean_direction)
    return sample_dataset(dist, "vmf-sphere", Split(n_train, n_val, n_test, seed, dtype))
