"""Dataset type, Standardizer, seeded splits, and the name -> loader registry."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from rnf_fast.data import (
    Dataset,
    Standardizer,
    VonMises,
    available_datasets,
    load_dataset,
    random_split,
)
from rnf_fast.data.registry import Split


def test_import_needs_no_optional_package():
    code = (
        "import sys, rnf_fast.data\n"
        "optional = ('sklearn', 'mlxtend', 'scipy', 'pandas', 'h5py', 'PIL')\n"
        "bad = [m for m in optional if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("mode", ["feature", "global"])
def test_standardizer_round_trips_and_saves(mode):
    x = torch.randn(200, 5, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0, 2.0]) + 7.0
    st = Standardizer(mode=mode).fit(x)
    y = st.transform(x)
    assert torch.allclose(y.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    if mode == "feature":
        assert torch.allclose(y.std(0, unbiased=False), torch.ones(5, dtype=torch.float64))
    else:
        assert y.var(0, unbiased=False).mean().item() == pytest.approx(1.0)
        assert torch.all(st.scale == st.scale[0])
    assert torch.allclose(st.inverse_transform(y), x, atol=1e-12)
    restored = Standardizer().load_state_dict(st.state_dict())
    assert torch.equal(restored.transform(x), y)
    assert set(st.state_dict()) == {"mean", "scale"}


def test_global_scale_keeps_a_circle_round_and_converts_densities():
    # von Mises on a circle of radius r around m: density in data units is p_VM(θ) / r
    r, m = 3.0, torch.tensor([5.0, -2.0], dtype=torch.float64)
    vm = VonMises(1.0)
    u = vm.sample(2000, rng=np.random.default_rng(0))
    x = r * u + m
    st = Standardizer(mode="global").fit(x)
    y = st.transform(x)
    radius = (y - st.transform(m[None])).norm(dim=1)
    assert radius.std().item() < 1e-10  # still a circle
    s = st.scale[0].item()
    log_p_std = vm.log_prob(u) - math.log(r / s)  # density on the standardised circle, radius r/s
    log_p_data = log_p_std + st.log_abs_det_jacobian(d=1)
    assert torch.allclose(log_p_data, vm.log_prob(u) - math.log(r), atol=1e-12)
    assert st.log_abs_det_jacobian(d=1).item() == pytest.approx(-math.log(s))


def test_feature_scale_correction_uses_the_tangent_space():
    st = Standardizer().load_state_dict({"mean": torch.zeros(2), "scale": torch.tensor([2.0, 5.0])})
    along_e1 = torch.tensor([[[1.0], [0.0]]], dtype=torch.float64)  # (B=1, D=2, d=1)
    assert st.log_abs_det_jacobian(tangent=along_e1).item() == pytest.approx(-math.log(2.0))
    diagonal = torch.tensor([[[1.0], [1.0]]], dtype=torch.float64)
    assert st.log_abs_det_jacobian(tangent=diagonal).item() == pytest.approx(
        -0.5 * math.log(29 / 2)
    )
    assert st.log_abs_det_jacobian(d=2).item() == pytest.approx(-math.log(10.0))
    with pytest.raises(ValueError, match="pass tangent"):
        st.log_abs_det_jacobian(d=1)
    with pytest.raises(ValueError, match=r"tangent must be \(B, 2, d\)"):
        st.log_abs_det_jacobian(tangent=torch.zeros(2, 3, 1))


def test_standardizer_errors():
    with pytest.raises(ValueError, match="mode must be"):
        Standardizer(mode="pixel")
    with pytest.raises(RuntimeError, match="not fitted"):
        Standardizer().transform(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"x must be \(N, D\)"):
        Standardizer().fit(torch.zeros(5))
    with pytest.raises(KeyError, match="scale"):
        Standardizer().load_state_dict({"mean": torch.zeros(3)})


def test_random_split_is_seeded_disjoint_and_complete():
    x = np.arange(100)[:, None] * np.ones((1, 3))
    labels = np.arange(100) % 7
    (tr, va, te), (ytr, yva, yte) = random_split(x, labels=labels, n_val=0.2, n_test=15, seed=4)
    assert (len(tr), len(va), len(te)) == (65, 20, 15)
    rows = np.concatenate([tr, va, te])[:, 0]
    assert sorted(rows.tolist()) == list(range(100))
    assert np.array_equal(ytr, tr[:, 0].astype(int) % 7)
    (tr2, _, _), _ = random_split(x, labels=labels, n_val=0.2, n_test=15, seed=4)
    assert np.array_equal(tr, tr2)
    (tr3, _, _), _ = random_split(x, n_train=10, seed=4)
    assert len(tr3) == 10
    with pytest.raises(ValueError, match="leave no training samples"):
        random_split(x, n_val=50, n_test=50)
    with pytest.raises(ValueError, match=r"n_val as a fraction must be in \[0, 1\)"):
        random_split(x, n_val=1.5)
    with pytest.raises(ValueError, match="n_train = 90"):
        random_split(x, n_train=90)


def test_dataset_checks_shapes_and_filters_classes():
    t = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="val has D = 2"):
        Dataset(name="x", train=t, val=torch.zeros(2, 2), test=t)
    with pytest.raises(ValueError, match=r"train must be a float tensor \(N, D\)"):
        Dataset(name="x", train=torch.zeros(4), val=t, test=t)
    with pytest.raises(ValueError, match=r"train_labels must be \(4,\)"):
        Dataset(name="x", train=t, val=t, test=t, train_labels=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="image_shape"):
        Dataset(name="x", train=t, val=t, test=t, image_shape=(2, 2))
    y = torch.tensor([0, 1, 2, 1])
    ds = Dataset(
        name="x",
        train=torch.arange(12.0).reshape(4, 3),
        val=t,
        test=t,
        train_labels=y,
        val_labels=y,
        test_labels=y,
    )
    ones = ds.select_classes([1])
    assert ones.train_labels.tolist() == [1, 1] and ones.train[:, 0].tolist() == [3.0, 9.0]
    assert ones.info["classes"] == [1] and ds.train.shape == (4, 3)
    with pytest.raises(ValueError, match="leave no training samples"):
        ds.select_classes([5])
    with pytest.raises(ValueError, match="no class labels"):
        Dataset(name="x", train=t, val=t, test=t).select_classes([0])


def test_registry_lists_and_loads():
    names = available_datasets()
    expected = "vonmises vmf-sphere embedded-sphere digits mnist5k power gas hepmass miniboone"
    for name in expected.split() + ["bsds300", "mnist-idx", "fashion-mnist-idx", "npy", "csv"]:
        assert name in names and isinstance(names[name], str) and names[name]
    ds = load_dataset("vonmises", kappa=2.0, n_train=50, n_val=5, n_test=5, seed=1)
    assert ds.entropy == pytest.approx(VonMises(2.0).entropy) and ds.train.shape == (50, 2)
    emb = load_dataset(
        "embedded-torus", d=3, D=40, n_train=20, n_val=2, n_test=2, dtype=torch.float64
    )
    assert (emb.d, emb.D, emb.train.dtype) == (3, 40, torch.float64)


def test_registry_bad_input_is_helpful(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known: vonmises, .*csv"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="kappa does not apply to dataset 'power'"):
        load_dataset("power", root=str(tmp_path), kappa=1.0)
    with pytest.raises(ValueError, match="root does not apply to dataset 'vonmises'"):
        load_dataset("vonmises", root=str(tmp_path))
    with pytest.raises(ValueError, match=r"reads local files: give root="):
        load_dataset("npy")
    with pytest.raises(FileNotFoundError, match="power/data.npy"):
        load_dataset("power", root=str(tmp_path))


def test_split_options_are_the_loaders_shared_steps():
    x, y = np.arange(40.0).reshape(20, 2), np.arange(20)
    split = Split(n_train=7, n_val=0.25, n_test=3, seed=5, dtype=torch.float64)
    (xs, ys), (want_x, want_y) = (
        split.shuffle(x, y),
        random_split(x, labels=y, n_train=7, n_val=0.25, n_test=3, seed=5),
    )
    assert all(np.array_equal(a, b) for a, b in zip(xs + ys, want_x + want_y))
    capped = Split(n_train=4, n_test=2, seed=1).cap([x, x[:5], x[:3]])
    assert [len(c) for c in capped] == [4, 5, 2]
    assert not np.array_equal(capped[0], x[:4])  # a seeded subset, not the first rows
    with pytest.raises(ValueError, match="n_val caps a published split and must be an int"):
        Split(n_val=0.5).cap([x, x, x])
    tensors = split.tensors([x[:, :1].T, x])  # a non-contiguous view is copied
    assert [t.dtype for t in tensors] == [torch.float64] * 2
    assert torch.equal(tensors[0], torch.from_numpy(x[:, 0])[None])
