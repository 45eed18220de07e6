"""Every plot writes a non-empty PNG, with tiny analytic models of a circle, a sphere, images."""

import json
import math
import subprocess
import sys

import pytest
import torch

from rnf_fast.data import Standardizer, make_vmf_sphere, make_von_mises
from rnf_fast.evaluation import (
    plot_image_grid,
    plot_manifold_2d,
    plot_manifold_3d,
    plot_samples_and_reconstructions,
    plot_training_curves,
)

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, returned):
    assert returned == path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000


class CircleModel:
    """decode(z) = (cos z, sin z), z ~ N(0, 1): |J| = 1, so log p(x) = log N(atan2(x))."""

    d = 1

    def encode(self, x):
        return torch.atan2(x[:, 1], x[:, 0])[:, None]

    def decode(self, z):
        return torch.cat([z.cos(), z.sin()], dim=1)

    def reconstruct(self, x):
        return self.decode(self.encode(x))

    def log_prob(self, x):
        return torch.distributions.Normal(0.0, 1.0).log_prob(self.encode(x)[:, 0])

    def sample(self, n):
        return self.decode(torch.randn(n, 1))


class SphereModel:
    """Spherical angles z = (θ, φ) ~ N((π/2, 0), 0.6²); log det JᵀJ = 2 log sin θ."""

    d = 2

    def encode(self, x):
        r = x.norm(dim=1)
        return torch.stack([torch.acos(x[:, 2] / r), torch.atan2(x[:, 1], x[:, 0])], dim=1)

    def decode(self, z):
        t, p = z[:, 0], z[:, 1]
        return torch.stack([t.sin() * p.cos(), t.sin() * p.sin(), t.cos()], dim=1)

    def reconstruct(self, x):
        return self.decode(self.encode(x))

    def log_prob(self, x):
        z = self.encode(x)
        base = torch.distributions.Normal(torch.tensor([math.pi / 2, 0.0]), 0.6).log_prob(z)
        return base.sum(1) - z[:, 0].sin().log()

    def sample(self, n):
        return self.decode(torch.tensor([math.pi / 2, 0.0]) + 0.6 * torch.randn(n, 2))


class ImageModel:
    """8×8 images x = W z + b (d = 6), encode by least squares."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(64, 6, generator=g) * 0.3
        self.b = torch.linspace(0, 1, 64)

    def decode(self, z):
        return z @ self.W.T + self.b

    def encode(self, x):
        return (x - self.b) @ torch.linalg.pinv(self.W).T

    def reconstruct(self, x):
        return self.decode(self.encode(x))

    def sample(self, n):
        return self.decode(torch.randn(n, 6))


def test_plot_manifold_2d_circle(tmp_path):
    ds = make_von_mises(n_train=500, n_val=10, n_test=10)
    path = tmp_path / "run" / "manifold.png"
    _assert_png(
        path,
        plot_manifold_2d(
            CircleModel(), ds.train, path, true_log_prob=ds.true_log_prob, title="circle"
        ),
    )


def test_plot_manifold_2d_behind_a_standardizer(tmp_path):
    ds = make_von_mises(n_train=300, n_val=10, n_test=10)
    st = Standardizer(mode="global", center=False).fit(ds.train)
    path = tmp_path / "manifold_std.png"
    _assert_png(path, plot_manifold_2d(CircleModel(), ds.train, path, standardizer=st))


def test_plot_manifold_3d_sphere(tmp_path):
    ds = make_vmf_sphere(n_train=800, n_val=10, n_test=10)
    path = tmp_path / "sphere.png"
    model = SphereModel()
    _assert_png(path, plot_manifold_3d(model, ds.train, path, true_log_prob=ds.true_log_prob))
    path = tmp_path / "sphere_no_truth.png"
    _assert_png(path, plot_manifold_3d(model, ds.train, path, n_grid=20))


def test_plot_manifold_checks_dimensions(tmp_path):
    with pytest.raises(ValueError, match=r"data must be \(N, 2\) with N >= 2, got \(10, 3\)"):
        plot_manifold_2d(CircleModel(), torch.randn(10, 3), tmp_path / "x.png")
    with pytest.raises(ValueError, match="latent dimension d = 2"):
        plot_manifold_3d(CircleModel(), torch.randn(10, 3), tmp_path / "x.png")
    with pytest.raises(TypeError, match="model must have the method.*log_prob"):
        plot_manifold_2d(object(), torch.randn(10, 2), tmp_path / "x.png")


@pytest.mark.parametrize(
    ("images", "image_shape"),
    [
        (torch.rand(10, 8, 8), None),
        (torch.rand(16, 3, 8, 8), None),
        (torch.rand(5, 64), (1, 8, 8)),
    ],
)
def test_plot_image_grid(tmp_path, images, image_shape):
    path = tmp_path / "grid.png"
    _assert_png(path, plot_image_grid(images, path, nrow=4, image_shape=image_shape))


def test_plot_image_grid_bad_input(tmp_path):
    with pytest.raises(ValueError, match="image_shape"):
        plot_image_grid(torch.rand(5, 64), tmp_path / "g.png", image_shape=(7, 7))
    with pytest.raises(ValueError, match="nrow"):
        plot_image_grid(torch.rand(5, 8, 8), tmp_path / "g.png", nrow=0)


def test_plot_samples_and_reconstructions(tmp_path):
    model = ImageModel()
    x = model.decode(torch.randn(40, 6)) + 0.05 * torch.randn(40, 64)
    path = tmp_path / "samples.png"
    state = torch.get_rng_state()
    out = plot_samples_and_reconstructions(model, x, (8, 8), path, n=24, nrow=6)
    assert torch.equal(torch.get_rng_state(), state)
    _assert_png(path, out)


def test_plot_training_curves(tmp_path):
    log = tmp_path / "metrics.jsonl"
    lines = [
        {
            "epoch": e,
            "train_loss": 10 / (e + 1),
            "val_loss": 11 / (e + 1),
            "nll": 3 - 0.1 * e,
            "recon": 1e-1 * 0.5**e,
            "lr": 1e-3,
            "step": 10 * e,
        }
        for e in range(12)
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n\n{"summary": true, "test_nll": 1.7}\n'
    log.write_text(text)
    path = tmp_path / "curves.png"
    _assert_png(path, plot_training_curves(log, path))
    only = tmp_path / "only.png"
    _assert_png(only, plot_training_curves(log, only, keys=["val_loss"]))


def test_plot_training_curves_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics_jsonl_path"):
        plot_training_curves(tmp_path / "missing.jsonl", tmp_path / "c.png")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "loss": \n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        plot_training_curves(bad, tmp_path / "c.png")
    no_epoch = tmp_path / "no_epoch.jsonl"
    no_epoch.write_text('{"loss": 1.0}\n')
    with pytest.raises(ValueError, match="numeric 'epoch'"):
        plot_training_curves(no_epoch, tmp_path / "c.png")


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install rnf_fast\[plots\]"):
        plot_image_grid(torch.rand(4, 8, 8), tmp_path / "g.png")


def test_import_does_not_import_matplotlib():
    code = "import sys, rnf_fast.evaluation; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
