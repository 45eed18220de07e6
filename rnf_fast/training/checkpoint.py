"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the model's config and state (ActNorm initialisation included), the
optimisers' states, the :class:`TrainState` (epochs done, best validation loss, early-stopping
counter, non-finite step counters, the session, the learning-rate schedule segment, the
calibrated decisions of ``method="auto"``, the per-epoch history) and the global torch RNG
states. It is written atomically and read with ``torch.load(weights_only=True)``. Checkpoints
written before ``session``, ``lr_segment`` and ``auto_calibration`` existed load with session 0,
the schedule of their saved training options and no calibrated decisions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from ..models import CheckpointError, RectangularFlow, atomic_save, load_payload, load_state

__all__ = ["CHECKPOINT_FORMAT", "TrainState", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FORMAT = "rnf_fast.checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class TrainState:
    """The trainer's progress, saved in every checkpoint.

    Attributes:
        epoch: epochs completed (the next epoch to run, counting from 0).
        best_val_loss: lowest validation loss since the warm-up ended, or None.
        best_epoch: the epoch that reached it, or None.
        bad_epochs: epochs since the last improvement (the early-stopping counter).
        nonfinite_run: consecutive skipped steps (non-finite loss or gradient) up to now.
        nonfinite_total: skipped steps in the whole run.
        stopped_early: whether early stopping ended the run.
        session: 0 for the original run, +1 each time it is resumed (the ``session`` of each
            epoch record).
        lr_segment: the learning-rate schedule the run follows from epoch ``start`` on:
            ``{"start", "factor", "epochs", "schedule", "min_factor"}`` (the schedule begins
            at ``factor`` · lr at epoch ``start``; see ``lr_schedule`` of
            :class:`~rnf_fast.training.TrainConfig`); None before the run starts.
        auto_calibration: the decisions of ``method="auto"`` timed on the device
            (:meth:`rnf_fast.engine.calibrate.Calibrator.state_dict`) when the run calibrates
            (``auto_calibrate``), so that a resumed run makes the same choices; else None.
        history: one metrics record per completed epoch (what ``metrics.jsonl`` holds).
    """

    epoch: int = 0
    best_val_loss: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    nonfinite_run: int = 0
    nonfinite_total: int = 0
    stopped_early: bool = False
    session: int = 0
    lr_segment: dict[str, Any] | None = None
    auto_calibration: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _rng_states() -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _check_dtypes(model: RectangularFlow, saved: dict[str, torch.Tensor], where: str) -> None:
    # load_state_dict would cast silently, and a float64 run resumed in float32 is another run.
    for key, value in model.state_dict().items():
        if key in saved and value.dtype != saved[key].dtype:
            raise CheckpointError(
                f"{where} holds {saved[key].dtype} weights ({key}) but the model is {value.dtype}; "
                f"convert the model first, e.g. model.to({saved[key].dtype})"
            )


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: RectangularFlow,
    optimizers: dict[str, Optimizer],
    state: TrainState,
    train_config: dict[str, Any],
) -> None:
    """Write a checkpoint of a run to path, atomically.

    Arguments:
        path: the checkpoint file.
        model: the model being trained.
        optimizers: the run's optimisers by name.
        state: the trainer's progress.
        train_config: the run's training options as plain values.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model.config.to_dict(),
        "train_config": dict(train_config),
        "model": model.state_dict(),
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "state": asdict(state),
        "rng": _rng_states(),
    }
    atomic_save(payload, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: RectangularFlow,
    optimizers: dict[str, Optimizer],
    objective: str,
) -> TrainState:
    """Restore a run from a checkpoint into model and optimizers; returns its :class:`TrainState`.

    Also restores the global torch RNG states.

    Arguments:
        path: the checkpoint file.
        model: a model built from the same config (its state is overwritten).
        optimizers: the run's optimisers by name, over the model's parameters.
        objective: the run's objective, which must be the checkpoint's.

    Raises:
        FileNotFoundError: there is no checkpoint at path.
        CheckpointError: the file is corrupt, or it belongs to a different model config,
            objective or set of optimisers.
    """
    payload = load_payload(path, kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    where = f"checkpoint {str(path)!r}"
    saved = payload["model_config"]
    current = model.config.to_dict()
    if saved != current:
        diff = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
        raise CheckpointError(
            f"{where} was written for a different model config; differing fields: "
            + ", ".join(f"{k} (saved {saved.get(k)!r}, now {current.get(k)!r})" for k in diff)
        )
    saved_objective = payload["train_config"].get("objective")
    if saved_objective != objective:
        raise CheckpointError(
            f"{where} was written with objective {saved_objective!r}, resuming with {objective!r}"
        )
    if set(payload["optimizers"]) != set(optimizers):
        raise CheckpointError(
            f"{where} holds optimisers {sorted(payload['optimizers'])}, "
            f"expected {sorted(optimizers)}"
        )
    _check_dtypes(model, payload["model"], where)
    load_state(model, payload["model"], what=f"the model in {where}")
    for name, opt in optimizers.items():
        try:
            opt.load_state_dict(payload["optimizers"][name])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"the optimiser {name!r} in {where}: {err}") from err
    _set_rng_states(payload["rng"])
    state = TrainState(**payload["state"])
    if state.lr_segment is None:
        saved = payload["train_config"]
        state.lr_segment = {
            "start": 0,
            "factor": 1.0,
            "epochs": saved["epochs"],
            "schedule": saved.get("lr_schedule", "constant"),
            "min_factor": saved.get("lr_min_factor", 0.01),
        }
    return state
