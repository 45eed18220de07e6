"""Every plot writes a non-empty PNG, with tiny analytic models of a circle, a sphere, images
and a small RectangularFlow in R^6; the projection and curves figures are also inspected."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from rnf_fast.data import Standardizer, make_vmf_sphere, make_von_mises
from rnf_fast.evaluation import (
    plot_image_grid,
    plot_manifold_2d,
    plot_manifold_3d,
    plot_manifold_projection,
    plot_samples_and_reconstructions,
    plot_training_curves,
)
from rnf_fast.evaluation.plots import _curves_figure, _pca, _projection_figure
from rnf_fast.models import RectangularFlow

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
    with pytest.raises(ImportError, match=r"pip install 'rnf_fast\[plots\]'"):
        plot_image_grid(torch.rand(4, 8, 8), tmp_path / "g.png")
    with pytest.raises(ImportError, match=r"pip install 'rnf_fast\[plots\]'"):
        plot_manifold_projection(ShiftModel(torch.randn(9, 6)), torch.randn(9, 6), tmp_path / "p")


def test_import_does_not_import_matplotlib():
    code = "import sys, rnf_fast.evaluation; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ------------------------------------------------------------------ projection for D > 3


def _sphere_in_r6(n, seed=0):
    """Points on a 2-sphere of radius 2 in a random 3-D subspace of R^6, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 3, generator=g)
    basis, _ = torch.linalg.qr(torch.randn(6, 3, generator=g))
    return 2 * (u / u.norm(dim=1, keepdim=True)) @ basis.T + 0.05 * torch.randn(n, 6, generator=g)


class ShiftModel:
    """reconstruct(x) = x / 2, samples = the first n rows of ``rows`` + 3: a wrong PCA refitted
    on the reconstructions or the samples would hide the scale and the shift."""

    def __init__(self, rows):
        self.rows = rows

    def reconstruct(self, x):
        return x / 2

    def sample(self, n):
        return self.rows[:n] + 3


def _numpy_pca(x, k):
    """Principal axes from numpy's eigendecomposition of the covariance (not an SVD), each
    signed so that its largest loading is positive (the convention the plots promise)."""
    x = np.asarray(x, dtype=np.float64)
    values, vectors = np.linalg.eigh(np.cov(x.T))
    order = np.argsort(values)[::-1][:k]
    axes = vectors[:, order].T
    axes *= np.sign(axes[np.arange(k), np.abs(axes).argmax(1)])[:, None]
    return x.mean(0), axes, values[order] / values.sum()


def test_pca_matches_numpy_with_a_fixed_sign():
    x = _sphere_in_r6(300) * torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    mean, axes, fraction = _pca(x, 3)
    np_mean, np_axes, np_fraction = _numpy_pca(x, 3)
    np.testing.assert_allclose(mean.numpy(), np_mean, atol=1e-12)
    np.testing.assert_allclose(fraction.numpy(), np_fraction, rtol=1e-9)
    np.testing.assert_allclose(axes.numpy(), np_axes, atol=1e-9)
    # Negating the data negates what the SVD returns; the sign convention must undo that.
    assert torch.allclose(_pca(-x, 3)[1], axes, atol=1e-12)


def test_projection_figure_uses_the_data_pca_for_every_panel():
    data = _sphere_in_r6(200, seed=1)
    fig = _projection_figure(
        ShiftModel(data),
        data,
        standardizer=None,
        true_log_prob=None,
        n_samples=50,
        max_points=500,
        seed=0,
        elev=20.0,
        azim=-60.0,
        title=None,
    )
    np_mean, np_axes, np_fraction = _numpy_pca(data, 3)

    def projected(x):
        return (x.double().numpy() - np_mean) @ np_axes.T

    def drawn(ax, index):
        # Path3DCollection keeps the 3-D points it was given in _offsets3d.
        return np.stack([np.asarray(c) for c in ax.collections[index]._offsets3d], axis=1)

    data_ax, rec_ax, sample_ax = fig.axes
    np.testing.assert_allclose(drawn(data_ax, 0), projected(data), atol=1e-9)
    # Collection 0 of the other panels is the faint data underneath; 1 is what the panel shows.
    np.testing.assert_allclose(drawn(rec_ax, 1), projected(data / 2), atol=1e-9)
    np.testing.assert_allclose(drawn(sample_ax, 1), projected(data[:50] + 3), atol=1e-9)
    for ax in fig.axes:
        labels = [ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()]
        expected = [f"PC{i + 1} ({100 * f:.1f}% of variance)" for i, f in enumerate(np_fraction)]
        assert labels == expected


def test_plot_manifold_projection_of_a_rectangular_flow_in_r6(tmp_path):
    data = _sphere_in_r6(400)
    st = Standardizer(mode="global").fit(data)
    model = RectangularFlow({"D": 6, "d": 2, "f_layers": 2, "h_layers": 2}).eval()
    model.initialize(st.transform(data))
    path = tmp_path / "run" / "manifold.png"
    state = torch.get_rng_state()
    out = plot_manifold_projection(
        model,
        data,
        path,
        standardizer=st,
        true_log_prob=lambda x: -x.square().sum(1),
        n_samples=200,
        max_points=300,
    )
    assert torch.equal(torch.get_rng_state(), state)
    _assert_png(path, out)


def test_plot_manifold_projection_bad_input(tmp_path):
    model = ShiftModel(torch.randn(10, 6))
    with pytest.raises(ValueError, match=r"D >= 3 for a 3-D projection, got \(10, 2\)"):
        plot_manifold_projection(model, torch.randn(10, 2), tmp_path / "p.png")
    with pytest.raises(ValueError, match="n_samples must be a positive int, got 0"):
        plot_manifold_projection(model, torch.randn(10, 6), tmp_path / "p.png", n_samples=0)
    with pytest.raises(TypeError, match="model must have the method.*sample"):
        plot_manifold_projection(object(), torch.randn(10, 6), tmp_path / "p.png")


# ------------------------------------------------------------------- curves: scale, resumes


def _write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _recon_records(epochs, session=None):
    """recon falls 0.3 -> 0.01 (1.5 decades: linear under the old two-decade rule)."""
    out = []
    for e in epochs:
        r = {"epoch": e, "train_recon": 0.3 * 0.7**e, "val_recon": 0.25 * 0.7**e, "nll": 2 - e / 10}
        if session is not None:
            r["session"] = session(e)
        out.append(r)
    return out


def _panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title().startswith(title))


def _resume_lines(ax):
    return [line for line in ax.lines if line.get_gid() == "resumed"]


def test_curves_reconstruction_is_log_scaled_and_other_panels_are_not(tmp_path):
    log = _write_log(tmp_path / "metrics.jsonl", _recon_records(range(10)))
    fig = _curves_figure(log, x_key="epoch", keys=None, title=None)
    assert _panel(fig, "recon").get_yscale() == "log"
    assert _panel(fig, "nll").get_yscale() == "linear"
    assert not any(_resume_lines(ax) for ax in fig.axes)  # no session field: no resume


def test_curves_drop_non_positive_values_from_the_log_axis(tmp_path):
    records = _recon_records(range(6))
    records[2]["val_recon"] = 0.0
    records[3]["train_recon"] = -1e-9
    log = _write_log(tmp_path / "metrics.jsonl", records)
    ax = _panel(_curves_figure(log, x_key="epoch", keys=None, title=None), "recon")
    assert ax.get_yscale() == "log"
    assert ax.get_title() == "recon (2 values <= 0 not shown)"
    assert all(y > 0 for line in ax.lines for y in line.get_ydata())
    # A panel with nothing positive to draw stays linear and keeps its values.
    zeros = _write_log(tmp_path / "zeros.jsonl", [{"epoch": e, "recon": 0.0} for e in range(3)])
    ax = _panel(_curves_figure(zeros, x_key="epoch", keys=None, title=None), "recon")
    assert ax.get_yscale() == "linear" and list(ax.lines[0].get_ydata()) == [0.0, 0.0, 0.0]


def test_curves_mark_each_resume(tmp_path):
    # Sessions 0 (epochs 0-3), 1 (4-6), 2 (7-9); "session" itself is not plotted.
    log = _write_log(
        tmp_path / "metrics.jsonl",
        _recon_records(range(10), session=lambda e: 0 if e < 4 else 1 if e < 7 else 2),
    )
    fig = _curves_figure(log, x_key="epoch", keys=None, title=None)
    assert not any(ax.get_title().startswith("session") for ax in fig.axes)
    for ax in fig.axes:
        if not ax.axison:
            continue
        lines = _resume_lines(ax)
        assert [line.get_xdata()[0] for line in lines] == [4, 7]
        assert all(line.get_linestyle() == "--" for line in lines)
        assert ax.get_legend_handles_labels()[1].count("resumed") == 1
    path = tmp_path / "curves.png"
    _assert_png(path, plot_training_curves(log, path))


def test_curves_plot_the_latest_copy_of_a_rewritten_epoch(tmp_path):
    # Session 0 wrote epochs 0-4; a resume from the epoch-3 checkpoint rewrote 3 and 4.
    first = _recon_records(range(5), session=lambda e: 0)
    again = [dict(r, nll=r["nll"] + 5, session=1) for r in first[3:]]
    log = _write_log(tmp_path / "metrics.jsonl", first + again)
    ax = _panel(_curves_figure(log, x_key="epoch", keys=None, title=None), "nll")
    (curve,) = [line for line in ax.lines if line.get_label() == "nll"]
    assert list(curve.get_xdata()) == [0, 1, 2, 3, 4]
    assert list(curve.get_ydata()) == [2.0, 1.9, 1.8, 1.7 + 5, 1.6 + 5]
    assert [line.get_xdata()[0] for line in _resume_lines(ax)] == [3]


def _trainer_records(train, val, steps):
    """Epoch records as the trainer writes them, with its counts of singular samples."""
    records = _recon_records(range(len(train)))
    for e, r in enumerate(records):
        r.update(train_loss=2.0 - e / 10, val_loss=2.1 - e / 10, skipped_steps=0, lr=1e-3)
        r.update(singular_skipped=train[e], val_singular=val[e], singular_steps=steps[e])
    return records


def _titles(fig):
    return [ax.get_title() for ax in fig.axes if ax.axison]


def test_curves_of_a_run_without_singular_samples_draw_no_count(tmp_path):
    records = _trainer_records([0] * 4, [0] * 4, [0] * 4)
    fig = _curves_figure(
        _write_log(tmp_path / "metrics.jsonl", records), x_key="epoch", keys=None, title=None
    )
    # Neither a "singular samples" panel nor the counts as loss-like curves of their own.
    assert not [t for t in _titles(fig) if "singular" in t]
    assert sorted(_titles(fig)) == ["loss", "lr", "nll", "recon", "skipped_steps"]


def test_curves_draw_the_singular_counts_in_one_panel_when_any_is_nonzero(tmp_path):
    records = _trainer_records([0, 5, 12, 3], [0, 0, 2, 1], [0, 0, 1, 0])
    log = _write_log(tmp_path / "metrics.jsonl", records)
    fig = _curves_figure(log, x_key="epoch", keys=None, title=None)
    singular = [t for t in _titles(fig) if "singular" in t]
    assert singular == ["singular samples skipped (1 step(s) skipped: all samples singular)"]
    ax = _panel(fig, "singular samples skipped")
    curves = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert curves == {"train": [0, 5, 12, 3], "val": [0, 0, 2, 1]}
    assert ax.get_yscale() == "linear" and ax.get_ylim()[0] == 0
    # The other panels are those of a run without singular samples.
    assert sorted(set(_titles(fig)) - set(singular)) == [
        "loss",
        "lr",
        "nll",
        "recon",
        "skipped_steps",
    ]
    # Keys given: the panel is drawn for the counts they name, and only for those.
    only = _curves_figure(log, x_key="epoch", keys=["val_singular", "val_loss"], title=None)
    ax = _panel(only, "singular samples skipped")
    assert [line.get_label() for line in ax.lines] == ["val"]
    assert _titles(_curves_figure(log, x_key="epoch", keys=["val_loss"], title=None)) == ["loss"]
    path = tmp_path / "curves.png"
    _assert_png(path, plot_training_curves(log, path))
