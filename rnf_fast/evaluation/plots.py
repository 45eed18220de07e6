"""Pictures of a rectangular flow: the learned manifold with its density (D = 2, D = 3, or a
PCA projection for any D >= 3), image grids, training curves.

Every function writes one PNG (parent folders are created) and returns its path. matplotlib is
imported when a function is called, never at import, and figures are drawn on an Agg canvas of
their own: no pyplot state, no change to the user's backend (``pip install 'rnf_fast[plots]'``).

Models are duck-typed as in :mod:`rnf_fast.evaluation.metrics`; data are in data units, and a
``standardizer`` (the one the model was trained behind) maps them to model units and back.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rnf_fast.evaluation.metrics import (
    _draw_samples,
    _require,
    data_log_prob,
    reconstruction_error,
)

from ..checks import check_rows

__all__ = [
    "plot_image_grid",
    "plot_manifold_2d",
    "plot_manifold_3d",
    "plot_manifold_projection",
    "plot_samples_and_reconstructions",
    "plot_training_curves",
]


def _matplotlib(module: str) -> Any:
    """Imports a matplotlib module, or says how to install matplotlib."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib, which is not installed: pip install 'rnf_fast[plots]'"
        ) from err


def _figure(*, figsize: tuple[float, float]) -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend change)."""
    fig = _matplotlib("matplotlib.figure").Figure(figsize=figsize, layout="constrained")
    _matplotlib("matplotlib.backends.backend_agg").FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _to_model(x: Tensor, standardizer: Any) -> Tensor:
    return x if standardizer is None else standardizer.transform(x)


def _to_data(y: Tensor, standardizer: Any) -> Tensor:
    return y if standardizer is None else standardizer.inverse_transform(y)


def _subsample(x: Tensor, max_points: int) -> Tensor:
    if x.shape[0] <= max_points:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_points]
    return x[idx]


def _latent_grid(model: Any, data: Tensor, standardizer: Any, d: int, n: int) -> Tensor:
    """A grid over the box spanned by the data's latent codes (5% margin): (n^d, d)."""
    with torch.no_grad():
        z = model.encode(_to_model(data, standardizer)).detach()
    if z.dim() != 2 or z.shape[1] != d:
        raise ValueError(
            f"this plot needs a model with latent dimension d = {d}, got z {tuple(z.shape)}"
        )
    lo, hi = z.min(0).values, z.max(0).values
    margin = 0.05 * (hi - lo)
    axes = [
        torch.linspace(a, b, n, dtype=z.dtype, device=z.device)
        for a, b in zip(lo - margin, hi + margin)
    ]
    return torch.cartesian_prod(*axes).reshape(-1, d)


def _decode(model: Any, z: Tensor, standardizer: Any) -> Tensor:
    with torch.no_grad():
        return _to_data(model.decode(z), standardizer).detach()


def _np(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


# ----------------------------------------------------------------------------- manifolds


def plot_manifold_2d(
    model: Any,
    data: Tensor,
    path: str | Path,
    *,
    standardizer: Any = None,
    true_log_prob: Any = None,
    n_grid: int = 400,
    max_points: int = 2000,
    title: str | None = None,
) -> Path:
    """Draws the learned curve g(z) coloured by the model density against 2-D data (d = 1, D = 2).

    Left: the data as points and the learned manifold, g over a z-grid spanning the data's
    codes, coloured by the model density p(g(z)). Right: the density along that curve against
    arc length: the model's, a histogram of the data projected onto the curve, and, if
    ``true_log_prob`` is given, the true density at each curve point's nearest point of the
    true manifold (comparable where the learned curve matches the true one).

    Arguments:
        model: has ``encode``, ``decode``, ``log_prob``; latent dimension 1.
        data: (N, 2) samples in data units.
        path: the PNG to write.
        standardizer: the ``Standardizer`` the model was trained behind, or None.
        true_log_prob: x (B, 2) -> (B,) true log density (e.g. ``dataset.true_log_prob``).
        n_grid: points on the z-grid; max_points: data points drawn (a fixed subset).
    Returns:
        path as a ``Path``.
    """
    _require(model, "encode", "decode", "log_prob")
    data = check_rows("data", data, 2, min_rows=2)
    LineCollection = _matplotlib("matplotlib.collections").LineCollection
    z = _latent_grid(model, data, standardizer, 1, n_grid)
    curve = _decode(model, z, standardizer)
    density = _np(data_log_prob(model, curve, standardizer=standardizer).exp())
    xy = _np(curve)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])

    fig = _figure(figsize=(11, 4.8))
    ax, ax_density = fig.subplots(1, 2, width_ratios=[1.1, 1])
    shown = _np(_subsample(data, max_points))
    ax.scatter(*shown.T, s=3, c="k", alpha=0.25, zorder=3, label="data", rasterized=True)
    segments = np.stack([xy[:-1], xy[1:]], axis=1)
    lines = LineCollection(segments, cmap="viridis", linewidths=4, label="learned manifold g(z)")
    lines.set_array(0.5 * (density[:-1] + density[1:]))
    ax.add_collection(lines)
    ax.autoscale()
    ax.set_aspect("equal", adjustable="datalim")
    ax.set(xlabel="$x_1$", ylabel="$x_2$", title="data and learned manifold")
    ax.legend(loc="best", fontsize="small")
    fig.colorbar(lines, ax=ax, label="model density p(x) (per unit length)")

    with torch.no_grad():
        z_data = _np(model.encode(_to_model(data, standardizer)).reshape(-1))
    arc_data = np.interp(z_data, _np(z.reshape(-1)), arc)
    ax_density.hist(arc_data, bins=50, density=True, color="0.8", label="data, projected")
    ax_density.plot(arc, density, color="C0", lw=2, label="model")
    if true_log_prob is not None:
        true_density = _np(true_log_prob(curve).exp())
        ax_density.plot(
            arc,
            true_density,
            "--",
            color="C3",
            lw=1.5,
            label="true, at the nearest true-manifold point",
        )
    ax_density.set(
        xlabel="arc length along the learned curve",
        ylabel="density (per unit length)",
        title="density along the learned manifold",
    )
    ax_density.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_manifold_3d(
    model: Any,
    data: Tensor,
    path: str | Path,
    *,
    standardizer: Any = None,
    true_log_prob: Any = None,
    n_grid: int = 60,
    max_points: int = 3000,
    elev: float = 20.0,
    azim: float = -60.0,
    title: str | None = None,
) -> Path:
    """Draws 3-D data beside the learned surface g(z) coloured by the model density (d = 2, D = 3).

    Left: the data (coloured by the true density when ``true_log_prob`` is given). Right: g
    over an n_grid × n_grid z-grid spanning the data's codes, coloured by p(g(z)). Both panels
    share the view, the axis limits and, when both are densities, the colour scale.

    Arguments:
        model: has ``encode``, ``decode``, ``log_prob``; latent dimension 2.
        data: (N, 3) samples in data units.
        path: the PNG to write.
        standardizer: the ``Standardizer`` the model was trained behind, or None.
        true_log_prob: x (B, 3) -> (B,) true log density, or None.
        n_grid: grid points per latent axis; max_points: data points drawn.
        elev, azim: the 3-D view angles in degrees.
    Returns:
        path as a ``Path``.
    """
    _require(model, "encode", "decode", "log_prob")
    data = check_rows("data", data, 3, min_rows=2)
    Normalize = _matplotlib("matplotlib.colors").Normalize
    surface = _decode(model, _latent_grid(model, data, standardizer, 2, n_grid), standardizer)
    surface = surface[torch.isfinite(surface).all(1)]
    density = _np(data_log_prob(model, surface, standardizer=standardizer).exp())
    shown = _subsample(data, max_points)
    true_density = None if true_log_prob is None else _np(true_log_prob(shown).exp())
    both = density if true_density is None else np.concatenate([density, true_density])
    # The top 1% is left out of the colour scale: a chart's singular points (e.g. the poles of
    # spherical angles) give a few huge densities that would flatten the rest into one colour.
    norm = Normalize(vmin=float(both.min()), vmax=float(np.quantile(both, 0.99)))

    pts, xyz = _np(surface), _np(shown)
    everything = np.concatenate([pts, xyz])
    lo, hi = everything.min(0), everything.max(0)
    fig = _figure(figsize=(12, 5.5))
    data_title = "data" if true_density is None else "data (true density)"
    panels = [
        (xyz, true_density, "data", data_title),
        (pts, density, "learned manifold g(z)", "learned manifold g(z) (model density)"),
    ]
    artists = []
    for i, (p, c, label, name) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        colour = "0.4" if c is None else c
        cmap = None if c is None else "viridis"
        artists.append(
            ax.scatter(
                *p.T,
                c=colour,
                cmap=cmap,
                norm=None if c is None else norm,
                s=3,
                alpha=0.8,
                label=label,
            )
        )
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), zlim=(lo[2], hi[2]))
        ax.set(xlabel="$x_1$", ylabel="$x_2$", zlabel="$x_3$", title=name)
        ax.set_box_aspect(np.maximum(hi - lo, 1e-3 * (hi - lo).max()))
        ax.view_init(elev=elev, azim=azim)
        ax.legend(loc="upper left", fontsize="small")
    fig.colorbar(
        artists[1], ax=fig.axes, shrink=0.7, extend="max", label="density p(x) (per unit area)"
    )
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _pca(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first k principal axes of x, computed in float64 by an SVD of the centred data.

    Each axis's sign is fixed so that its largest loading in absolute value (the first one on
    a tie) is positive: the same data give the same picture whatever the SVD routine returns.

    Arguments:
        x: (N, D) data with min(N, D) >= k.
        k: the number of axes.
    Returns:
        mean (D,), axes (k, D) with orthonormal rows, and the fraction of the total variance
        along each axis (k,) (zeros for constant data).
    """
    x = x.detach().to("cpu", torch.float64)
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    axes = vh[:k]
    largest = axes.gather(1, axes.abs().argmax(1, keepdim=True))
    axes = torch.where(largest < 0, -axes, axes)
    variance = s.square()
    total = variance.sum()
    fraction = variance[:k] / total if total > 0 else torch.zeros_like(variance[:k])
    return mean, axes, fraction


def _finite_rows(x: Tensor) -> tuple[Tensor, int]:
    """The rows of x (N, D) without NaN or Inf, and how many were dropped."""
    keep = torch.isfinite(x).all(1)
    return x[keep], int((~keep).sum())


def _dropped(n: int) -> str:
    return f" ({n} non-finite not shown)" if n else ""


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _projection_figure(
    model: Any,
    data: Tensor,
    *,
    standardizer: Any,
    true_log_prob: Any,
    n_samples: int,
    max_points: int,
    seed: int | None,
    elev: float,
    azim: float,
    title: str | None,
) -> Any:
    """The Figure that :func:`plot_manifold_projection` saves (arguments as there)."""
    _require(model, "reconstruct", "sample")
    data = check_rows("data", data, min_rows=3)
    if data.shape[1] < 3:
        raise ValueError(
            f"data must be (N, D) with D >= 3 for a 3-D projection, got {tuple(data.shape)}; "
            "plot_manifold_2d draws D = 2"
        )
    _check_count("n_samples", n_samples)
    _check_count("max_points", max_points)
    fig = _figure(figsize=(15, 5.4))
    # The constrained layout does not see 3-D z labels: w_pad (inches) leaves room for them.
    fig.get_layout_engine().set(w_pad=0.3)
    mean, axes, fraction = _pca(data, 3)

    def project(x: Tensor) -> np.ndarray:
        return _np((x.detach().to("cpu", torch.float64) - mean) @ axes.T)

    shown = _subsample(data, max_points)
    with torch.no_grad():
        rec = _to_data(model.reconstruct(_to_model(shown, standardizer)), standardizer).detach()
    samples = _draw_samples(
        model, n_samples, batch_size=min(n_samples, 1024), seed=seed, device=data.device
    )
    samples, bad_samples = _finite_rows(_to_data(samples, standardizer))
    # An untrained or diverged flow can send points to Inf: leave them out, say how many.
    finite = torch.isfinite(rec).all(1)
    rec, bad_rec = rec[finite], int((~finite).sum())
    mse = float(reconstruction_error(shown[finite], rec.to(shown))) if len(rec) else math.nan

    xyz, xyz_rec, xyz_samples = project(shown), project(rec), project(samples)
    everything = np.concatenate([xyz, xyz_rec, xyz_samples])
    lo, hi = everything.min(0), everything.max(0)
    colour = None if true_log_prob is None else _np(true_log_prob(shown))
    panels = [
        (xyz, "data" if colour is None else "data (true log density)", "data", "0.3"),
        (
            xyz_rec,
            f"reconstructions g(g†(x)) (MSE {mse:.3g}){_dropped(bad_rec)}",
            "reconstructions",
            "C1",
        ),
        (xyz_samples, f"samples{_dropped(bad_samples)}", "samples", "C2"),
    ]
    labels = [f"PC{i + 1} ({100 * float(f):.1f}% of variance)" for i, f in enumerate(fraction)]
    for i, (points, name, label, c) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        if i == 0 and colour is not None:
            # Points whose true density is not finite (off the true support) are drawn grey.
            cmap = _matplotlib("matplotlib").colormaps["viridis"].with_extremes(bad="0.6")
            dots = ax.scatter(
                *points.T, c=colour, cmap=cmap, plotnonfinite=True, s=3, alpha=0.8, label=label
            )
            fig.colorbar(dots, ax=ax, shrink=0.6, pad=0.12, label="true log density log p(x)")
        else:
            if i > 0:
                ax.scatter(*xyz.T, c="0.6", s=2, alpha=0.25, label="data", rasterized=True)
            ax.scatter(*points.T, c=c, s=3, alpha=0.8, label=label, rasterized=True)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), zlim=(lo[2], hi[2]), title=name)
        ax.set_xlabel(labels[0], fontsize="small")
        ax.set_ylabel(labels[1], fontsize="small")
        ax.set_zlabel(labels[2], fontsize="small")
        ax.set_box_aspect(np.maximum(hi - lo, 1e-3 * (hi - lo).max()), zoom=0.9)
        ax.view_init(elev=elev, azim=azim)
        ax.legend(loc="upper left", fontsize="small")
    total = 100 * float(fraction.sum())
    fig.suptitle(
        title
        or f"data, reconstructions and samples on the data's first 3 principal axes "
        f"(D = {data.shape[1]}; {total:.1f}% of the data's variance)"
    )
    return fig


def plot_manifold_projection(
    model: Any,
    data: Tensor,
    path: str | Path,
    *,
    standardizer: Any = None,
    true_log_prob: Any = None,
    n_samples: int = 2000,
    max_points: int = 2000,
    seed: int | None = 0,
    elev: float = 20.0,
    azim: float = -60.0,
    title: str | None = None,
) -> Path:
    """Draws data, their reconstructions and model samples on the data's first 3 principal axes.

    For any D >= 3, where the manifold itself cannot be drawn. The principal axes are fitted
    on all of ``data`` (in data units) and the same centring and axes are applied to the
    reconstructions and the samples, so an offset or a collapsed direction shows as such.
    Three 3-D panels share the axes, the limits and the view: the data (coloured by the true
    log density when ``true_log_prob`` is given), the reconstructions g(g†(x)) of the shown
    data over them, and samples over them. The axis labels give each axis's share of the
    data's variance; the PCA signs are fixed (each axis's largest loading is positive), so
    pictures of the same data are comparable across runs. Non-finite rows are left out and
    counted in the panel titles.

    Arguments:
        model: has ``reconstruct`` and ``sample``; any latent dimension.
        data: (N, D) samples in data units, N >= 3, D >= 3.
        path: the PNG to write.
        standardizer: the ``Standardizer`` the model was trained behind, or None.
        true_log_prob: x (B, D) -> (B,) true log density, or None.
        n_samples: model samples drawn; max_points: data points shown and reconstructed (a
            fixed subset).
        seed: seeds the samples (the global RNG state is restored); None draws freely.
        elev, azim: the 3-D view angles in degrees.
        title: figure title; default says what is shown and the variance the 3 axes hold.
    Returns:
        path as a ``Path``.
    """
    fig = _projection_figure(
        model,
        data,
        standardizer=standardizer,
        true_log_prob=true_log_prob,
        n_samples=n_samples,
        max_points=max_points,
        seed=seed,
        elev=elev,
        azim=azim,
        title=title,
    )
    return _save(fig, path)


# -------------------------------------------------------------------------------- images


def _as_images(images: object, image_shape: tuple[int, ...] | None) -> np.ndarray:
    """(N, H, W, C) float array from (N, H, W), (N, C, H, W) or flat (N, D) + image_shape."""
    if not isinstance(images, Tensor) or images.dim() < 2 or images.shape[0] == 0:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a non-empty tensor (N, ...), got {got}")
    if image_shape is not None:
        if math.prod(image_shape) != images[0].numel():
            raise ValueError(
                f"image_shape {tuple(image_shape)} does not match the {images[0].numel()} "
                "values per image"
            )
        images = images.reshape(images.shape[0], *image_shape)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            "images must be (N, H, W), (N, 1, H, W) or (N, 3, H, W) (or flat with image_shape), "
            f"got {tuple(images.shape)}"
        )
    return _np(images).transpose(0, 2, 3, 1)


def _grid(images: np.ndarray, *, nrow: int, value_range: tuple[float, float] | None) -> np.ndarray:
    """Tiles (N, H, W, C) images, nrow per row, 1-pixel white gaps, values scaled to [0, 1]."""
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive int, got {nrow!r}")
    lo, hi = value_range if value_range is not None else (images.min(), images.max())
    scaled = np.clip((images - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    N, H, W, C = scaled.shape
    cols, rows = min(nrow, N), math.ceil(N / nrow)
    grid = np.ones((rows * (H + 1) + 1, cols * (W + 1) + 1, C))
    for k in range(N):
        r, c = divmod(k, cols)
        grid[1 + r * (H + 1) : (r + 1) * (H + 1), 1 + c * (W + 1) : (c + 1) * (W + 1)] = scaled[k]
    return grid[..., 0] if C == 1 else grid


def _show_grid(ax: Any, grid: np.ndarray, title: str) -> None:
    ax.imshow(grid, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()


def plot_image_grid(
    images: Tensor,
    path: str | Path,
    *,
    nrow: int = 8,
    image_shape: tuple[int, ...] | None = None,
    value_range: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """Writes a grid of images, nrow per row (as torchvision's ``make_grid``).

    Arguments:
        images: (N, H, W), (N, C, H, W) with C = 1 or 3, or flat (N, D) with ``image_shape``.
        path: the PNG to write.
        nrow: images per row.
        image_shape: (H, W) or (C, H, W) to unflatten (N, D) images.
        value_range: (black, white) pixel values; default the images' (min, max).
        title: figure title.
    Returns:
        path as a ``Path``.
    """
    grid = _grid(_as_images(images, image_shape), nrow=nrow, value_range=value_range)
    height, width = grid.shape[:2]
    scale = 8.0 / max(height, width)
    fig = _figure(figsize=(max(width * scale, 3.0), max(height * scale, 3.0) + 0.4))
    _show_grid(
        fig.add_subplot(), grid, title or f"{_as_images(images, image_shape).shape[0]} images"
    )
    return _save(fig, path)


def plot_samples_and_reconstructions(
    model: Any,
    x: Tensor,
    image_shape: tuple[int, ...],
    path: str | Path,
    *,
    standardizer: Any = None,
    n: int = 32,
    nrow: int = 8,
    seed: int | None = 0,
    value_range: tuple[float, float] | None = None,
    title: str | None = None,
) -> Path:
    """Writes three image grids side by side: test images, their reconstructions, model samples.

    All three share one grey scale (default the test images' range; out-of-range sample
    pixels are clipped), so a blurred or shifted reconstruction shows as such.

    Arguments:
        model: has ``reconstruct`` and ``sample``.
        x: (N, D) flat images in data units; the first n are shown.
        image_shape: (H, W) or (C, H, W), C·H·W = D.
        path: the PNG to write.
        standardizer: the ``Standardizer`` the model was trained behind, or None.
        n: images per grid; nrow: images per row.
        seed: seeds the samples (the global RNG state is restored); None draws freely.
        value_range: (black, white) pixel values.
    Returns:
        path as a ``Path``.
    """
    _require(model, "reconstruct", "sample")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be flat images (N, D), got {getattr(x, 'shape', type(x))}")
    x = x[:n]
    with torch.no_grad():
        x_rec = _to_data(model.reconstruct(_to_model(x, standardizer)), standardizer).detach()
    samples = _draw_samples(model, n, batch_size=n, seed=seed, device=x.device)
    samples = _to_data(samples, standardizer)
    data = _as_images(x, image_shape)
    if value_range is None:
        value_range = (float(data.min()), float(data.max()))
    mse = float(reconstruction_error(x, x_rec.to(x)))
    panels = [
        (data, "test images"),
        (_as_images(x_rec, image_shape), f"reconstructions (MSE {mse:.3g})"),
        (_as_images(samples, image_shape), "samples"),
    ]
    grids = [(_grid(a, nrow=nrow, value_range=value_range), t) for a, t in panels]
    height, width = max(g.shape[0] for g, _ in grids), max(g.shape[1] for g, _ in grids)
    scale = 4.5 / max(height, width)
    fig = _figure(figsize=(3 * width * scale + 0.6, height * scale + 0.8))
    for ax, (grid, name) in zip(fig.subplots(1, 3), grids):
        _show_grid(ax, grid, name)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ------------------------------------------------------------------------ training curves

_NOT_CURVES = {
    "epoch",
    "step",
    "global_step",
    "iteration",
    "seed",
    "session",
    "time",
    "elapsed",
    "wall_time",
}
_SPLITS = ("train", "val", "valid", "test")
_FIRST_PANELS = ("loss", "nll", "recon", "recon_error", "reconstruction", "frechet")
_SINGULAR_COUNTS = {"singular_skipped": "train", "val_singular": "val"}
"""The trainer's per-epoch counts of samples left out because their JᵀJ is numerically singular
(rnf_fast.training.trainer), and their labels in the one panel that shows them."""
_SINGULAR_STEPS = "singular_steps"
"""The trainer's count of steps skipped because every sample of the batch was singular: named in
that panel's title, not drawn (its unit is steps, not samples)."""
_SINGULAR_PANEL = "singular samples skipped"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"metrics_jsonl_path: no file at {path}")
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {i}: not valid JSON ({err.msg})") from err
        if isinstance(record, dict):
            records.append(record)
    return records


def _panel_name(key: str) -> str:
    """The metric a key measures, without its split: "val_nll" and "train_nll" -> "nll"."""
    for split in _SPLITS:
        if key.startswith(split + "_"):
            return key[len(split) + 1 :]
        if key.endswith("_" + split):
            return key[: -len(split) - 1]
    return key


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _latest_per_x(records: list[dict[str, Any]], x_key: str) -> list[dict[str, Any]]:
    """One record per value of x_key, the last one written (a run resumed after a crash may
    write an epoch again), sorted by x_key; records without a numeric x_key are dropped."""
    latest = {r[x_key]: r for r in records if _is_number(r.get(x_key))}
    return [latest[x] for x in sorted(latest)]


def _session(record: dict[str, Any]) -> int | float:
    """The record's training session: 0 for the original run, +1 per resume; 0 if absent."""
    session = record.get("session")
    return session if _is_number(session) else 0


def _resumes(records: list[dict[str, Any]], x_key: str) -> list[int | float]:
    """The x of each record whose session differs from the one before it: where a resume began."""
    return [r[x_key] for prev, r in zip(records, records[1:]) if _session(r) != _session(prev)]


def _is_error_panel(name: str) -> bool:
    """Reconstruction errors fall by decades towards 0 and look flat on a linear axis."""
    return name.startswith("recon")


def _plot_panel(ax: Any, name: str, series: dict[str, list[tuple[float, float]]]) -> None:
    """Draws a panel's curves; log y for reconstruction errors and for positive values spanning
    more than two decades. Points <= 0 cannot be drawn on a log axis: they are left out and
    counted in the title, and a panel with no positive value stays linear."""
    values = [y for pts in series.values() for _, y in pts]
    log = bool(values) and (
        _is_error_panel(name) or (min(values) > 0 and max(values) / min(values) > 100)
    )
    log = log and max(values) > 0
    hidden = sum(y <= 0 for y in values) if log else 0
    for key, pts in series.items():
        if log:
            pts = [(x, y) for x, y in pts if y > 0]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=key)
    if log:
        ax.set_yscale("log")
    ax.set_title(name + (f" ({hidden} values <= 0 not shown)" if hidden else ""))


def _singular_panel(
    records: list[dict[str, Any]], x_key: str, keys: list[str] | None
) -> dict[str, list[tuple[float, float]]] | None:
    """The series of the "singular samples skipped" panel, {label: [(x, count)]}, or None when
    there is no such panel: by default, when every count is 0 or absent (a healthy run draws
    nothing extra); with explicit ``keys``, when they name no count."""
    wanted = [k for k in _SINGULAR_COUNTS if keys is None or k in keys]
    series = {
        _SINGULAR_COUNTS[k]: [(r[x_key], r[k]) for r in records if _is_number(r.get(k))]
        for k in wanted
    }
    series = {label: pts for label, pts in series.items() if pts}
    if not series or (keys is None and not any(y for pts in series.values() for _, y in pts)):
        return None
    return series


def _draw_singular_panel(
    ax: Any, series: dict[str, list[tuple[float, float]]], steps: float
) -> None:
    """Counts per epoch on a linear axis from 0; ``steps``: steps skipped, named in the title."""
    for label, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=label)
    ax.set_ylim(bottom=0)
    title = _SINGULAR_PANEL
    if steps:
        title += f" ({steps:.0f} step(s) skipped: all samples singular)"
    ax.set_title(title)


def _curves_figure(
    metrics_jsonl_path: str | Path,
    *,
    x_key: str,
    keys: list[str] | None,
    title: str | None,
) -> Any:
    """The Figure that :func:`plot_training_curves` saves (arguments as there)."""
    source = Path(metrics_jsonl_path)
    records = _latest_per_x(_read_jsonl(source), x_key)
    if not records:
        raise ValueError(f"metrics_jsonl_path: no line of {source} has a numeric {x_key!r}")
    singular = _singular_panel(records, x_key, keys)
    if keys is None:
        keys = sorted(
            {k for r in records for k, v in r.items() if _is_number(v)} - _NOT_CURVES - {x_key}
        )
    # The counts of singular samples are no loss curves: they go to their own panel, if any.
    keys = [k for k in keys if k not in _SINGULAR_COUNTS and k != _SINGULAR_STEPS]
    if not keys and singular is None:
        raise ValueError(f"metrics_jsonl_path: {source} has no numeric metrics to plot")
    panels: dict[str, list[str]] = {}
    for key in keys:
        panels.setdefault(_panel_name(key), []).append(key)
    first = {name: i for i, name in enumerate(_FIRST_PANELS)}
    names = sorted(panels, key=lambda name: (first.get(name, len(first)), name))
    if singular is not None:
        names.append(_SINGULAR_PANEL)
    resumes = _resumes(records, x_key)

    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(figsize=(4.6 * cols, 3.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        if name == _SINGULAR_PANEL and singular is not None:
            steps = sum(r[_SINGULAR_STEPS] for r in records if _is_number(r.get(_SINGULAR_STEPS)))
            _draw_singular_panel(ax, singular, steps)
        else:
            series = {
                key: [
                    (r[x_key], r[key])
                    for r in records
                    if _is_number(r.get(key)) and math.isfinite(r[key])
                ]
                for key in panels[name]
            }
            _plot_panel(ax, name, series)
        for i, x in enumerate(resumes):
            ax.axvline(
                x,
                ls="--",
                lw=1,
                color="0.45",
                gid="resumed",
                label="resumed" if i == 0 else "_nolegend_",
            )
        ax.set(xlabel=x_key, ylabel="samples" if name == _SINGULAR_PANEL else name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_axis_off()
    fig.suptitle(title or source.name)
    return fig


def plot_training_curves(
    metrics_jsonl_path: str | Path,
    path: str | Path,
    *,
    x_key: str = "epoch",
    keys: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """Plots each numeric metric of a JSON-lines training log against the epoch.

    Each line is a dict; lines without ``x_key`` (e.g. a final summary) are skipped, and when
    an ``x_key`` value appears twice (a run resumed after a crash may write an epoch again)
    the last line wins. Keys that differ only by a split prefix or suffix ("train_loss",
    "val_loss", "loss") share a panel. Reconstruction errors ("recon…" panels) use a log
    scale, as does any panel whose values are all positive and span more than two decades;
    values <= 0 are left out of a log panel and counted in its title. The trainer's counts of
    samples left out for a numerically singular JᵀJ (``singular_skipped``, ``val_singular``;
    ``singular_steps`` is named in the title) are not curves of their own: one "singular
    samples skipped" panel shows them per epoch, train and val, when any is nonzero (or when
    ``keys`` names them), and nothing is added otherwise. Where the integer
    ``"session"`` field of the records changes (0 for the original run, +1 per resume;
    absent counts as 0), a dashed vertical line labelled "resumed" marks the first epoch of
    the new session in every panel.

    Arguments:
        metrics_jsonl_path: the log, one JSON object per line.
        path: the PNG to write.
        x_key: the key on the x axis.
        keys: the keys to plot; default every numeric key except counters such as "step"
            and "session" (and the singular counts, drawn as said above).
        title: figure title; default the log's file name.
    Returns:
        path as a ``Path``.
    """
    return _save(_curves_figure(metrics_jsonl_path, x_key=x_key, keys=keys, title=title), path)
