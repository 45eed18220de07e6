"""Tabular loaders on tiny files written in each published format."""

import inspect
import sys
import types

import numpy as np
import pytest
import torch

from rnf_fast.data import (
    load_bsds300,
    load_csv,
    load_dataset,
    load_gas,
    load_hepmass,
    load_miniboone,
    load_npy,
    load_power,
)


def _rows(*tensors: torch.Tensor) -> list[tuple]:
    return sorted(tuple(r) for t in tensors for r in t.tolist())


def test_npy_round_trip_and_split(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 3))
    np.save(tmp_path / "x.npy", x)
    ds = load_npy(tmp_path / "x.npy", seed=1, dtype=torch.float64)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (40, 5, 5)
    assert _rows(ds.train, ds.val, ds.test) == _rows(torch.from_numpy(x))
    assert ds.d is None and ds.true_log_prob is None
    same = load_dataset("npy", root=str(tmp_path / "x.npy"), seed=1, dtype=torch.float64)
    assert torch.equal(same.train, ds.train)


def test_npy_bad_input(tmp_path):
    np.save(tmp_path / "flat.npy", np.zeros(10))
    with pytest.raises(ValueError, match=r"2-D array \(N, D\).*\(10,\)"):
        load_npy(tmp_path / "flat.npy")
    bad = np.ones((10, 2))
    bad[3, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        load_npy(tmp_path / "nan.npy")
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        load_npy(tmp_path / "missing.npy")


@pytest.mark.parametrize("header", [True, False])
def test_csv_with_and_without_header(tmp_path, header):
    x = np.arange(60, dtype=np.float64).reshape(20, 3) / 7
    path = tmp_path / "x.csv"
    np.savetxt(path, x, delimiter=",", header="a,b,c" if header else "", comments="")
    ds = load_csv(path, n_val=2, n_test=3, dtype=torch.float64)  # header detected
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 2, 3)
    assert np.allclose(np.array(_rows(ds.train, ds.val, ds.test)), x, rtol=1e-15)
    assert ds.info["columns"] == (["a", "b", "c"] if header else None)


def test_csv_bad_input(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("a,b\n1,2\n3,4\n5,6\n7,8\n")
    with pytest.raises(ValueError, match="not a numeric table"):
        load_csv(path, header=False)
    path.write_text("1;2\n3;4\n5;6\n")
    with pytest.raises(ValueError, match="delimiter ','"):
        load_csv(path)
    assert load_csv(path, delimiter=";", n_val=1, n_test=1).D == 2


def test_power_follows_maf(tmp_path):
    raw = np.random.default_rng(0).uniform(0, 5, size=(200, 8))
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    ds = load_power(tmp_path, dtype=torch.float64)
    assert ds.D == 6 and (len(ds.train), len(ds.val), len(ds.test)) == (162, 18, 20)
    both = torch.cat([ds.train, ds.val])
    assert torch.allclose(both.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(both.std(0, unbiased=False), torch.ones(6, dtype=torch.float64))
    # the time column (last, no noise) of the test split: tail of the RandomState(42) shuffle
    shuffled = raw.copy()
    np.random.RandomState(42).shuffle(shuffled)
    t = shuffled[:, 7]
    expected = (t[-20:] - t[:-20].mean()) / t[:-20].std()
    assert np.allclose(ds.test[:, 5].numpy(), expected, atol=1e-12)
    capped = load_power(tmp_path, n_train=10, n_test=3)
    assert (len(capped.train), len(capped.val), len(capped.test)) == (10, 18, 3)
    with pytest.raises(ValueError, match="caps a published split"):
        load_power(tmp_path, n_val=0.5)


def test_power_bad_shape(tmp_path):
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", np.zeros((30, 7)))
    with pytest.raises(ValueError, match=r"\(N >= 20, 8\), got \(30, 7\)"):
        load_power(tmp_path)


def test_miniboone_follows_maf(tmp_path):
    raw = np.random.default_rng(1).normal(size=(100, 5)) * 3 + 1
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    ds = load_miniboone(tmp_path, dtype=torch.float64)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (81, 9, 10)
    mu, s = raw[:90].mean(0), raw[:90].std(0)
    assert np.allclose(ds.test.numpy(), (raw[90:] - mu) / s, atol=1e-12)
    assert np.allclose(ds.val.numpy(), (raw[81:90] - mu) / s, atol=1e-12)


@pytest.mark.parametrize("name", ["power", "gas", "hepmass", "miniboone", "bsds300"])
def test_maf_missing_files_name_the_expected_path(tmp_path, name):
    expected = {
        "power": "power/data.npy",
        "gas": "gas/ethylene_CO.pickle",
        "hepmass": "hepmass/1000_train.csv",
        "miniboone": "miniboone/data.npy",
        "bsds300": "BSDS300/BSDS300.hdf5",
    }[name]
    with pytest.raises(FileNotFoundError, match=expected):
        load_dataset(name, root=str(tmp_path))


def test_gas_follows_maf(tmp_path):
    pd = pytest.importorskip("pandas", reason="GAS is a pandas pickle")
    rng = np.random.default_rng(2)
    s1, s3, s5 = rng.normal(size=(3, 100))
    frame = pd.DataFrame(
        {
            "Time": np.arange(100.0),
            "Meth": rng.normal(size=100),
            "Eth": rng.normal(size=100),
            "s1": s1,
            "s2": 2 * s1 + 1e-3 * rng.normal(size=100),
            "s3": s3,
            "s4": -s3,
            "s5": s5,
        }
    )
    (tmp_path / "gas").mkdir()
    frame.to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    ds = load_gas(tmp_path, dtype=torch.float64)
    kept = frame[["s2", "s3", "s4", "s5"]]  # s1 is the first of the pair with correlation > 0.98
    expected = ((kept - kept.mean()) / kept.std()).to_numpy()
    assert ds.D == 4 and (len(ds.train), len(ds.val), len(ds.test)) == (81, 9, 10)
    assert np.allclose(torch.cat([ds.train, ds.val, ds.test]).numpy(), expected, atol=1e-12)


def test_hepmass_follows_maf(tmp_path):
    pytest.importorskip("pandas", reason="HEPMASS is read with pandas")
    rng = np.random.default_rng(3)

    def table(n, extra):
        label = (np.arange(n) % 4 != 0).astype(float)  # a quarter is background, dropped
        f0, f1 = rng.normal(size=(2, n))
        f2 = np.where(np.arange(n) % 3 == 0, -1.0, rng.uniform(0, 1, n))  # smallest value repeats
        cols = [label, f0, f1, f2, np.full(n, 1000.0)] + ([rng.normal(size=n)] if extra else [])
        return np.stack(cols, 1)

    train, test = table(120, extra=False), table(40, extra=True)
    (tmp_path / "hepmass").mkdir()
    header = "# label,f0,f1,f2,mass"
    np.savetxt(
        tmp_path / "hepmass" / "1000_train.csv", train, delimiter=",", header=header, comments=""
    )
    np.savetxt(
        tmp_path / "hepmass" / "1000_test.csv",
        test,
        delimiter=",",
        header=header + ",junk",
        comments="",
    )
    ds = load_hepmass(tmp_path, dtype=torch.float64)
    signal = train[train[:, 0] == 1][:, 1:3]
    mu, s = signal.mean(0), signal.std(0, ddof=1)
    assert ds.D == 2 and (len(ds.train), len(ds.val), len(ds.test)) == (81, 9, 30)
    assert np.allclose(torch.cat([ds.train, ds.val]).numpy(), (signal - mu) / s, atol=1e-12)
    test_signal = test[test[:, 0] == 1][:, 1:3]
    assert np.allclose(ds.test.numpy(), (test_signal - mu) / s, atol=1e-12)


def test_bsds300_reads_the_three_splits(tmp_path, monkeypatch):
    arrays = {
        "train": np.ones((12, 63)),
        "validation": np.zeros((4, 63)),
        "test": np.full((5, 63), 2.0),
    }

    class FakeFile(dict):
        def __init__(self, path, mode):
            super().__init__(arrays)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    (tmp_path / "BSDS300").mkdir()
    (tmp_path / "BSDS300" / "BSDS300.hdf5").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", types.SimpleNamespace(File=FakeFile))
    ds = load_bsds300(tmp_path, n_train=10)
    assert ds.D == 63 and (len(ds.train), len(ds.val), len(ds.test)) == (10, 4, 5)
    assert ds.test.unique().tolist() == [2.0]


def test_missing_optional_packages_say_what_to_install(tmp_path, monkeypatch):
    for sub, name in (("BSDS300", "BSDS300.hdf5"), ("gas", "ethylene_CO.pickle")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, "h5py", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        load_bsds300(tmp_path)
    with pytest.raises(ImportError, match="pip install pandas"):
        load_gas(tmp_path)


MAF_LOADERS = {
    "power": load_power,
    "gas": load_gas,
    "hepmass": load_hepmass,
    "miniboone": load_miniboone,
    "bsds300": load_bsds300,
}


@pytest.mark.parametrize("name", list(MAF_LOADERS))
def test_maf_loaders_share_one_signature_and_say_what_they_read(name):
    # The five are built by one factory: the public signature and name must be the loader's.
    loader = MAF_LOADERS[name]
    P = inspect.Parameter
    params = inspect.signature(loader).parameters.values()
    assert [(p.name, p.kind, p.default) for p in params] == [
        ("root", P.POSITIONAL_OR_KEYWORD, P.empty),
        ("n_train", P.KEYWORD_ONLY, None),
        ("n_val", P.KEYWORD_ONLY, None),
        ("n_test", P.KEYWORD_ONLY, None),
        ("seed", P.KEYWORD_ONLY, 0),
        ("dtype", P.KEYWORD_ONLY, torch.float32),
    ]
    assert loader.__name__ == f"load_{name}"
    doc = inspect.getdoc(loader)
    assert "as in MAF" in doc and "n_train, n_val, n_test cap the published splits" in doc, doc
