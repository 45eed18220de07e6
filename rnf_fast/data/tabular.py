"""Tabular data: user arrays (.npy, .csv) and the MAF benchmark sets from local files.

The MAF loaders read the files in their published layout under a root folder (root/power/data.npy,
root/gas/ethylene_CO.pickle, root/hepmass/1000_{train,test}.csv, root/miniboone/data.npy,
root/BSDS300/BSDS300.hdf5) and apply the preprocessing of the MAF paper's code (Papamakarios et
al. 2017), so that NLLs compare with published numbers: the returned data are already normalised
as described there and must not be standardised again for such comparisons. Their splits are
the published ones; n_train / n_val / n_test only cap them (a seeded subset), for quick runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from rnf_fast.data.registry import Dataset, Split, optional_import

__all__ = [
    "TABLE_SUFFIXES",
    "read_table",
    "load_npy",
    "load_csv",
    "load_power",
    "load_gas",
    "load_hepmass",
    "load_miniboone",
    "load_bsds300",
]

_MAF = "MAF preprocessing (Papamakarios et al. 2017)"


def _check_table(x: np.ndarray, where: str) -> np.ndarray:
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 1:
        raise ValueError(
            f"{where}: data must be a 2-D array (N, D) with N >= 3, got shape {x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{where}: data must be numeric, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{where}: data contain NaN or inf ({int((~np.isfinite(x)).sum())} entries)"
        )
    return x


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: expected the file {path}")
    return path


def _dataset(name: str, splits, split: Split, info: dict) -> Dataset:
    train, val, test = split.tensors(splits)
    return Dataset(name=name, train=train, val=val, test=test, info=info)


def _read_npy(path: Path) -> np.ndarray:
    """The array of a .npy file, with errors that name the file."""
    path = _require_file(path, "npy")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty, expected a .npy array (N, D)")
    try:
        x = np.load(path, allow_pickle=False)
    except (EOFError, ValueError, OSError) as err:
        # A truncated file gives a bare EOFError, a text file a ValueError about its header.
        raise ValueError(f"{path}: not a readable .npy array file ({err})") from err
    return _check_table(x, str(path))


def _first_line(path: Path) -> str:
    """The first non-empty line of a text file ("" for an empty one); a ValueError that names
    the file when it is not text (a .npy file given as csv, for example)."""
    try:
        with open(path) as f:
            return next((line for line in f if line.strip()), "")
    except UnicodeDecodeError as err:
        hint = " (a .npy array? load it as the dataset npy)" if path.suffix == ".npy" else ""
        raise ValueError(f"{path}: not a text .csv file, it holds binary data{hint}") from err


def _has_header(path: Path, delimiter: str) -> bool:
    """True when the first non-empty line has a field that is not a number."""
    first = _first_line(path)
    try:
        [float(field.strip().strip("\"'")) for field in first.split(delimiter)]
    except ValueError:
        return True
    return False


def _read_csv(
    path: Path, *, header: bool | None = None, delimiter: str = ","
) -> tuple[np.ndarray, list[str] | None]:
    """The numeric table of a .csv file and its column names (None without a header line)."""
    path = _require_file(path, "csv")
    if header is None:
        header = _has_header(path, delimiter)
    columns = None
    if header:
        first = _first_line(path)
        columns = [c.strip().strip("\"'") for c in first.rstrip("\n").split(delimiter)]
    try:
        x = np.loadtxt(path, delimiter=delimiter, skiprows=int(header), ndmin=2, dtype=np.float64)
    except ValueError as err:
        raise ValueError(
            f"{path}: not a numeric table with delimiter {delimiter!r}: {err}"
        ) from err
    return _check_table(x, str(path)), columns


TABLE_SUFFIXES = (".npy", ".csv")
"""The file types of :func:`read_table`, told apart by the file's extension."""


def read_table(path: str | Path, *, delimiter: str = ",") -> np.ndarray:
    """The rows (N, D) of a .npy or .csv file, by its extension (csv: header line detected).

    Arguments:
        path: a ``.npy`` array or a numeric ``.csv`` table, N >= 3 finite rows.
        delimiter: the field separator of a csv file.
    Returns:
        The array (N, D) as stored (a csv file as float64).
    """
    path = Path(path)
    if path.suffix == ".npy":
        return _read_npy(path)
    if path.suffix == ".csv":
        return _read_csv(path, delimiter=delimiter)[0]
    raise ValueError(f"{path}: expected a .npy or .csv file (told apart by the extension)")


def _held_out(
    path: str | Path | None, n: int | float | None, what: str, *, width: int, delimiter: str
) -> tuple[np.ndarray | None, int | float]:
    """The rows of a validation or test file (None without one) and the count or fraction
    still to cut from the training file for that split: 0 with a file, else ``n`` (default
    0.1)."""
    if path is None:
        return None, 0.1 if n is None else n
    if n is not None:
        raise ValueError(
            f"n_{what} does not apply with {what}_file: the {what} set is that whole file"
        )
    x = read_table(path, delimiter=delimiter)
    if x.shape[1] != width:
        raise ValueError(
            f"the {what} file {path} has D = {x.shape[1]} columns, but the training file has "
            f"D = {width} (--{what} must match --train)"
        )
    return x, 0


def _user_table(
    name: str,
    x: np.ndarray,
    path: Path,
    *,
    val_file: str | Path | None,
    test_file: str | Path | None,
    n_train: int | None,
    n_val: int | float | None,
    n_test: int | float | None,
    seed: int,
    dtype: torch.dtype,
    delimiter: str = ",",
    info: dict | None = None,
) -> Dataset:
    """A user array (N, D) as train / val / test: the given val and test files as they are,
    the splits without a file cut from x by a seeded shuffle (:func:`random_split`)."""
    opts = {"width": x.shape[1], "delimiter": delimiter}
    val, n_val = _held_out(val_file, n_val, "val", **opts)
    test, n_test = _held_out(test_file, n_test, "test", **opts)
    split = Split(n_train, n_val, n_test, seed, dtype)
    (train, cut_val, cut_test), _ = split.shuffle(x)
    splits = (train, cut_val if val is None else val, cut_test if test is None else test)
    files = {"val_file": val_file, "test_file": test_file}
    info = {"path": str(path), "seed": seed, **(info or {})}
    info.update({k: str(v) for k, v in files.items() if v is not None})
    return _dataset(name, splits, split, info)


def load_npy(
    path: str | Path,
    *,
    val_file: str | Path | None = None,
    test_file: str | Path | None = None,
    n_train: int | None = None,
    n_val: int | float | None = None,
    n_test: int | float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """A user array (N, D) from a .npy file, split into train, val and test.

    The rows are shuffled by numpy's ``default_rng(seed)``; the first ``n_val`` rows of the
    shuffle are validation, the next ``n_test`` test, the rest training (capped at
    ``n_train``). ``n_val`` and ``n_test`` are counts or fractions of N (default 0.1 each,
    rounded: 80 / 10 / 10). ``val_file`` / ``test_file`` (a .npy or .csv file each, by
    extension, of the same width D) are the validation / test set instead: nothing is cut from
    this file for that split, and ``n_val`` / ``n_test`` do not apply.
    """
    x = _read_npy(Path(path))
    return _user_table(
        "npy",
        x,
        Path(path),
        val_file=val_file,
        test_file=test_file,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
        dtype=dtype,
    )


def load_csv(
    path: str | Path,
    *,
    val_file: str | Path | None = None,
    test_file: str | Path | None = None,
    header: bool | None = None,
    delimiter: str = ",",
    n_train: int | None = None,
    n_val: int | float | None = None,
    n_test: int | float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """A user array (N, D) from a numeric .csv file, split into train, val and test as by
    :func:`load_npy`.

    header: True/False, or None to detect it (a first line with a non-numeric field). The
    column names go to info["columns"]. ``delimiter`` applies to csv validation and test files
    too.
    """
    x, columns = _read_csv(Path(path), header=header, delimiter=delimiter)
    return _user_table(
        "csv",
        x,
        Path(path),
        val_file=val_file,
        test_file=test_file,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        seed=seed,
        dtype=dtype,
        delimiter=delimiter,
        info={"columns": columns},
    )


def _tail_split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAF split: the last 10% is test, the last 10% of the rest is validation; no shuffle."""
    n_test = int(0.1 * data.shape[0])
    rest, test = data[: data.shape[0] - n_test], data[data.shape[0] - n_test :]
    n_val = int(0.1 * rest.shape[0])
    return rest[: rest.shape[0] - n_val], rest[rest.shape[0] - n_val :], test


def _normalise_by_train_val(splits):
    """Subtracts the mean and divides by the std (ddof 0) of train and validation together."""
    both = np.vstack(splits[:2])
    mu, s = both.mean(axis=0), both.std(axis=0)
    return tuple((x - mu) / s for x in splits)


_MAF_OPTIONS = """

    n_train, n_val, n_test cap the published splits (a seeded subset, for quick runs: ints or
    None for the whole split); seed seeds the subsets; dtype is that of the returned tensors."""
Splits = tuple[np.ndarray, np.ndarray, np.ndarray]


def _maf_loader(name: str, read: Callable[[Path], Splits]) -> Callable[..., Dataset]:
    """The public loader of MAF set ``name``: ``read(root)`` gives its published splits, already
    preprocessed; the loader caps them (:meth:`Split.cap`) and returns the `Dataset`. The
    loader's docstring is the reader's, with the options appended."""

    def load(
        root: str | Path,
        *,
        n_train: int | None = None,
        n_val: int | None = None,
        n_test: int | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> Dataset:
        split = Split(n_train, n_val, n_test, seed, dtype)
        capped = split.cap(read(Path(root)))
        return _dataset(name, capped, split, {"root": str(root), "preprocessing": _MAF})

    load.__name__ = load.__qualname__ = f"load_{name}"
    load.__doc__ = read.__doc__ + _MAF_OPTIONS
    return load


def _read_power(root: Path) -> Splits:
    """UCI household power (root/power/data.npy, (N, 8)) as in MAF: D = 6.

    Shuffle with RandomState(42); drop columns 3 (global intensity) and 1 (reactive power);
    add uniform noise (0.001 to gap, 0.01 to voltage, 1 to the three sub-meterings, 0 to time;
    the same RandomState, in MAF's order); tail split; normalise by train+val mean/std."""
    path = _require_file(root / "power" / "data.npy", "POWER")
    data = np.load(path, allow_pickle=False)
    if data.ndim != 2 or data.shape[1] != 8 or data.shape[0] < 20:
        raise ValueError(f"{path}: POWER data must be (N >= 20, 8), got {data.shape}")
    data = data.astype(np.float64)
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    N = data.shape[0]
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    voltage_noise = 0.01 * rng.rand(N, 1)
    gap_noise = 0.001 * rng.rand(N, 1)
    sm_noise = rng.rand(N, 3)
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, np.zeros((N, 1))))
    return _normalise_by_train_val(_tail_split(data))


def _read_gas(root: Path) -> Splits:
    """UCI gas sensors, ethylene–CO (root/gas/ethylene_CO.pickle, a pandas pickle) as in MAF: D = 8.

    Drop the Meth, Eth and Time columns; while some column has a correlation > 0.98 with another,
    drop the first such column; normalise by the mean/std (ddof 1) of all rows; tail split.
    Needs pandas."""
    path = _require_file(root / "gas" / "ethylene_CO.pickle", "GAS")
    pd = optional_import("pandas", extra="pandas", purpose="GAS (a pandas pickle)")
    data = pd.read_pickle(path).drop(columns=["Meth", "Eth", "Time"])
    while True:
        n_correlated = (data.corr() > 0.98).to_numpy().sum(axis=1)
        if not np.any(n_correlated > 1):
            break
        data = data.drop(columns=data.columns[np.flatnonzero(n_correlated > 1)[0]])
    data = ((data - data.mean()) / data.std()).to_numpy(dtype=np.float64)
    return _tail_split(_check_table(data, str(path)))


def _too_discrete(col: np.ndarray) -> bool:
    """MAF's HEPMASS feature test: the smallest value occurs > 5 times (or the column is NaN)."""
    return not np.all(np.isfinite(col)) or Counter(col.tolist())[col.min()] > 5


def _read_hepmass(root: Path) -> Splits:
    """UCI HEPMASS (root/hepmass/1000_train.csv, 1000_test.csv) as in MAF: D = 21.

    Keep the signal rows (first column == 1) and drop that column; drop the test file's last
    column (as MAF does); normalise both by the train mean/std (ddof 1), aligned by column name;
    drop every feature whose smallest value occurs more than 5 times in train (MAF's test for
    "too many re-occurring values"), and constant features, whose normalisation is undefined;
    the last 10% of train is validation. Needs pandas."""
    folder = root / "hepmass"
    train_path = _require_file(folder / "1000_train.csv", "HEPMASS")
    test_path = _require_file(folder / "1000_test.csv", "HEPMASS")
    pd = optional_import("pandas", extra="pandas", purpose="HEPMASS (read with pandas)")
    train = pd.read_csv(train_path, index_col=False)
    test = pd.read_csv(test_path, index_col=False)
    train = train[train[train.columns[0]] == 1].drop(columns=train.columns[0])
    test = test[test[test.columns[0]] == 1].drop(columns=test.columns[0])
    test = test.drop(columns=test.columns[-1])
    mu, s = train.mean(), train.std()
    train, test = ((train - mu) / s).to_numpy(np.float64), ((test - mu) / s).to_numpy(np.float64)
    drop = [j for j, col in enumerate(train.T) if _too_discrete(col)]
    train = np.delete(train, drop, axis=1)
    test = np.delete(test, [j for j in drop if j < test.shape[1]], axis=1)
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"HEPMASS: after MAF preprocessing train has {train.shape[1]} features, "
            f"test {test.shape[1]}"
        )
    n_held = int(0.1 * train.shape[0])
    cut = train.shape[0] - n_held
    return train[:cut], train[cut:], _check_table(test, str(test_path))


def _read_miniboone(root: Path) -> Splits:
    """MiniBooNE (root/miniboone/data.npy, as cleaned by the MAF scripts) as in MAF: D = 43.

    Tail split (no shuffle); normalise by the train+val mean/std (ddof 0)."""
    path = _require_file(root / "miniboone" / "data.npy", "MINIBOONE")
    data = _check_table(np.load(path, allow_pickle=False).astype(np.float64), str(path))
    return _normalise_by_train_val(_tail_split(data))


def _read_bsds300(root: Path) -> Splits:
    """BSDS300 8×8 image patches (root/BSDS300/BSDS300.hdf5) as in MAF: D = 63.

    The "train", "validation" and "test" arrays are used as stored (MAF's file is already
    preprocessed: grey levels dequantised, the mean removed, the last pixel dropped). Needs
    h5py."""
    path = _require_file(root / "BSDS300" / "BSDS300.hdf5", "BSDS300")
    h5py = optional_import("h5py", extra="h5py", purpose="BSDS300 (an HDF5 file)")
    with h5py.File(path, "r") as f:
        missing = [k for k in ("train", "validation", "test") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing datasets {missing}")
        train, val, test = (
            _check_table(np.asarray(f[k][()]), f"{path}[{k}]")
            for k in ("train", "validation", "test")
        )
    return train, val, test


load_power = _maf_loader("power", _read_power)
load_gas = _maf_loader("gas", _read_gas)
load_hepmass = _maf_loader("hepmass", _read_hepmass)
load_miniboone = _maf_loader("miniboone", _read_miniboone)
load_bsds300 = _maf_loader("bsds300", _read_bsds300)
