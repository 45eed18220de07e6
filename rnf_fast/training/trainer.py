"""The trainer: Adam over epochs of shuffled batches, validation with the exact log det, early
stopping, atomic checkpoints and exact resumption, in one process or many (DDP).

A run lives in a folder::

    run_dir/metrics.jsonl   one JSON record per epoch (train and validation metrics)
    run_dir/checkpoint.pt   the latest checkpoint (``resume=True`` continues from it)
    run_dir/best.pt         the model with the lowest validation loss (``RectangularFlow.load``)
    run_dir/model.pt        the final model (the best one when ``restore_best``)

Randomness: the batch order and the CG probes of epoch e come from generators seeded by
(``seed``, e) (and the rank, for probes), so a resumed run draws what the uninterrupted run
would have drawn.

Resuming: ``resume=True`` continues from ``checkpoint.pt``. With the same ``epochs`` the run is
bit for bit the uninterrupted one. A resume may extend (or cut) ``epochs``: the learning-rate
schedule then continues from the value it had reached, without a jump (see ``lr_schedule`` of
:class:`TrainConfig`). Each resume that trains starts a new *session*: every epoch record
carries ``session``, 0 for the original run and +1 per resume, so plots can mark the resumes.
With ``auto_calibrate`` (``method="auto"`` timed on the device), the checkpoint holds the
decisions and the timings under way, and a resumed run goes on with them: it makes the same
choices without timing again.

Singular samples: in the ML objective a sample whose JᵀJ is numerically singular (the decoder's
Jacobian rank deficient to the precision of the model's dtype, as
``rnf_fast.logdet_grad`` detects it) is dropped from the loss, log det and reconstruction
alike, and the loss is the mean over the other samples of the batch (see
:mod:`rnf_fast.training.objectives`); a batch whose samples are all singular takes no step. The
validation metrics leave such samples out the same way. Each epoch record counts them
(``singular_skipped``, ``singular_steps``, ``val_singular``, summed over the DDP ranks), and an
epoch with any gives one warning (rank 0), in place of the engine's warning per call.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Adam, Optimizer
from tqdm.auto import tqdm

from ..checks import check_rows
from ..engine.api import DEFAULT_CG_TOL
from ..engine.calibrate import Calibrator, calibration_requested, merge_calibration_states
from ..engine.checks import warn_at_caller
from ..engine.probes import PROBE_KINDS
from ..engine.truncation import Roulette
from ..models import RectangularFlow, load_payload, load_state
from ..models.rectangular import MODEL_FORMAT, MODEL_VERSION, SINGULAR_WARNING
from . import distributed
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .objectives import OBJECTIVES, Objective

__all__ = ["TrainConfig", "TrainHistory", "likelihood_weight", "train"]

METHODS = ("auto", "exact", "cg")


@dataclass(frozen=True)
class TrainConfig:
    """Training options, all plain values (a CLI fills it from flags or a file via ``from_dict``).

    Fields:
        objective: ``"ml"``, ``"ts"`` (two-step; alternates by epoch, manifold phase first) or
            ``"ml-no-logdet"``.
        method, probes, probe_kind, cg_tol, chunk_size: of the log-det gradient
            (``rnf_fast.logdet_grad``)
            in training; validation always uses the exact log det.
        auto_calibrate: with ``method="auto"``, choose between exact and CG by timing both on
            the first steps of each batch shape (:mod:`rnf_fast.engine.calibrate`) instead of
            by the fitted CPU cost model. The decisions are saved in every checkpoint, so a
            resumed run makes the same choices without timing again. The environment variable
            ``RNF_FAST_AUTO_CALIBRATE=1``, read when the run starts, switches it on too. With
            another method it is a ``ValueError``.
        cg_max_iter: CG's iteration cap (None: d).
        cg_truncation: None, or ``{"min_iter": m, "continue_prob": q}``: CG's randomized
            truncation (:class:`rnf_fast.engine.truncation.Roulette`), drawn from the probes'
            generator.
        beta: β, the weight of the reconstruction penalty.
        warmup_start, warmup_end: the likelihood weight w is 0 up to epoch ``warmup_start``,
            rises linearly (per step) to 1 at epoch ``warmup_end``, and is 1 after. While w is
            0 the log det is not computed. Epochs count from 0; early stopping considers epochs
            from ``warmup_end`` on. The TS objective ignores w.
        lr: Adam's learning rate.
        lr_schedule: ``"constant"`` or ``"cosine"`` (lr decays per epoch along a half cosine to
            ``lr_min_factor`` · lr at the last epoch, ``epochs - 1``; a one-epoch run keeps lr).
            The schedule is a function of the epoch, so a resumed run with the same ``epochs``
            follows it exactly. A resume that changes ``epochs``, ``lr_schedule`` or
            ``lr_min_factor`` continues the learning rate from the value the schedule had
            reached: from the first resumed epoch e0 it starts at the fraction f0 of lr that the
            previous schedule gives at e0 (``lr_min_factor`` for a run that completed its
            cosine), and moves along a half cosine from f0 · lr to ``lr_min_factor`` · lr at the
            new last epoch (``"constant"``: it stays at f0 · lr). So a finished cosine run
            extended from 3 to 6 epochs trains the 3 new ones at its final learning rate, and
            an interrupted one decays over the new total from where it stopped: no jump up,
            no warm restart. (To restart the schedule, start a new run from ``model.pt``.)
        lr_min_factor: the final fraction of lr under the cosine schedule.
        epochs: total number of epochs of the run (a resumed run counts the ones done).
        batch_size: global batch size (split across processes under DDP).
        patience: stop after this many epochs without a lower validation loss; None: never.
        clip: clip the gradient norm to this value; None: no clipping.
        seed: seeds the batch order, the probes, the ActNorm batch and the global RNG.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        max_nonfinite: stop with a RuntimeError after this many consecutive skipped steps
            (non-finite loss or gradient).
        init_samples: size of the random batch that initialises ActNorm.
        eval_chunk_size: rows per chunk of the validation log-likelihood.
        restore_best: end with the weights of the best validation epoch.
        progress: what rank 0 shows on stderr while training: ``True``, tqdm progress bars
            when stderr is a terminal and otherwise one line per epoch (a log file gets no
            per-step lines); ``"epochs"``, one line per epoch; ``False``, nothing.

    The validation loss is the same for every objective: -mean log p(x) + β mean
    ‖x - g(g†(x))‖², with the exact log det, so runs of different objectives compare.
    """

    objective: str = "ml"
    method: str = "auto"
    auto_calibrate: bool = False
    probes: int = 1
    probe_kind: str = "rademacher"
    cg_tol: float = DEFAULT_CG_TOL
    cg_max_iter: int | None = None
    cg_truncation: dict | None = None
    chunk_size: int | None = None
    beta: float = 50.0
    warmup_start: int = 0
    warmup_end: int = 0
    lr: float = 1e-3
    lr_schedule: str = "constant"
    lr_min_factor: float = 0.01
    epochs: int = 100
    batch_size: int = 128
    patience: int | None = 20
    clip: float | None = None
    seed: int = 0
    device: str = "cpu"
    max_nonfinite: int = 20
    init_samples: int = 1024
    eval_chunk_size: int = 1024
    restore_best: bool = True
    progress: bool | str = True

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.probe_kind not in PROBE_KINDS:
            raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {self.probe_kind!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.auto_calibrate, bool):
            raise ValueError(f"auto_calibrate must be True or False, got {self.auto_calibrate!r}")
        if self.auto_calibrate and self.method != "auto":
            raise ValueError(
                f"auto_calibrate applies to method='auto' only, got method={self.method!r}"
            )
        if not (isinstance(self.progress, bool) or self.progress == "epochs"):
            raise ValueError(f"progress must be True, False or 'epochs', got {self.progress!r}")
        for name in ("probes", "epochs", "batch_size", "max_nonfinite", "init_samples"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("eval_chunk_size", self.eval_chunk_size, low=1)
        for name in ("warmup_start", "warmup_end", "seed"):
            _check_int(name, getattr(self, name), low=0)
        if self.warmup_end < self.warmup_start:
            raise ValueError(
                f"warmup_end must be >= warmup_start = {self.warmup_start}, got {self.warmup_end}"
            )
        if self.cg_truncation is not None:
            try:
                Roulette(**self.cg_truncation)
            except (TypeError, ValueError) as err:
                raise ValueError(
                    f"cg_truncation must be None or {{'min_iter': m, 'continue_prob': q}} "
                    f"(m >= 1, 0 < q < 1), got {self.cg_truncation!r}: {err}"
                ) from err
        for name, value in (
            ("patience", self.patience),
            ("chunk_size", self.chunk_size),
            ("cg_max_iter", self.cg_max_iter),
        ):
            if value is not None:
                _check_int(name, value, low=1)
        for name, value in (("lr", self.lr), ("cg_tol", self.cg_tol), ("clip", self.clip)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if not (math.isfinite(self.lr_min_factor) and 0 < self.lr_min_factor <= 1):
            raise ValueError(f"lr_min_factor must be in (0, 1], got {self.lr_min_factor!r}")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(
                f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}"
            ) from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for, but CUDA is not available")

    def to_dict(self) -> dict[str, Any]:
        """The options as a dict of plain values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping, raising ``ValueError`` on unknown keys (missing: defaults)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class TrainHistory:
    """What a run did.

    Attributes:
        records: one metrics dict per epoch, as in ``metrics.jsonl``: ``epoch``, ``phase``
            (TS: ``"manifold"`` or ``"density"``, else None), ``weight`` (the likelihood weight
            at the epoch's last step), ``train_<part>`` means over the epoch's finite steps
            (parts as in ``rnf_fast.training.objectives``; ``train_recon`` is ‖x - g(g†(x))‖²
            summed over the D coordinates),
            ``val_loss``, ``val_nll``, ``val_recon``, ``val_logdet``, ``best``,
            ``skipped_steps`` (steps with a non-finite loss or gradient), ``singular_skipped``
            (training samples left out of the loss because their JᵀJ is numerically singular;
            ML with the log det only), ``singular_steps`` (steps skipped because all their
            samples were), ``val_singular`` (validation samples left out of the ``val_``
            metrics for the same reason), ``lr``, ``session`` (0 for the original run, +1 per
            resume), ``seconds``. Non-finite values are None.
        best_epoch, best_val_loss: the best validation epoch after the warm-up, if any.
        stop_reason: why the run ended.
        nonfinite_steps: steps skipped in the whole run.
    """

    records: list[dict[str, Any]]
    best_epoch: int | None
    best_val_loss: float | None
    stop_reason: str
    nonfinite_steps: int


def learning_rate(
    config: TrainConfig, epoch: int, *, start: int = 0, start_factor: float = 1.0
) -> float:
    """The learning rate of ``epoch`` (from 0) under ``config.lr_schedule``.

    Arguments:
        config: the options (``lr``, ``lr_schedule``, ``lr_min_factor``, ``epochs``).
        epoch: the epoch, >= start.
        start, start_factor: the segment of the schedule that epoch is in: it begins at epoch
            ``start`` at ``start_factor`` · lr (0 and 1 for a run that was never resumed with
            other ``epochs``; see ``lr_schedule`` of :class:`TrainConfig`).

    Example:
        >>> config = TrainConfig(lr=1.0, lr_schedule="cosine", lr_min_factor=0.1, epochs=3)
        >>> [round(learning_rate(config, e), 3) for e in range(3)]
        [1.0, 0.55, 0.1]
        >>> config = TrainConfig(lr=1.0, lr_schedule="cosine", lr_min_factor=0.1, epochs=6)
        >>> [round(learning_rate(config, e, start=3, start_factor=0.1), 3) for e in range(3, 6)]
        [0.1, 0.1, 0.1]
    """
    return config.lr * _schedule_factor(
        config.lr_schedule, config.epochs, config.lr_min_factor, start, start_factor, epoch
    )


def _schedule_factor(
    schedule: str, epochs: int, min_factor: float, start: int, start_factor: float, epoch: int
) -> float:
    """The fraction of lr at ``epoch`` on the schedule segment that begins at ``start``."""
    last = epochs - 1
    if schedule == "constant" or last <= start:
        return start_factor
    progress = min((epoch - start) / (last - start), 1.0)
    return min_factor + (start_factor - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def _segment(config: TrainConfig, start: int, start_factor: float) -> dict[str, Any]:
    """A schedule segment as saved in :attr:`TrainState.lr_segment`."""
    return {
        "start": start,
        "factor": start_factor,
        "epochs": config.epochs,
        "schedule": config.lr_schedule,
        "min_factor": config.lr_min_factor,
    }


def _continue_schedule(segment: dict[str, Any], config: TrainConfig, epoch: int) -> dict[str, Any]:
    """The schedule segment a run resumed at ``epoch`` with ``config`` follows.

    The saved ``segment`` when ``epochs``, ``lr_schedule`` and ``lr_min_factor`` are unchanged
    (the run continues exactly); otherwise a new one that starts at ``epoch`` from the fraction
    of lr the saved segment gives there (see ``lr_schedule`` of :class:`TrainConfig`).
    """
    same = (segment["epochs"], segment["schedule"], segment["min_factor"]) == (
        config.epochs,
        config.lr_schedule,
        config.lr_min_factor,
    )
    if same:
        return segment
    factor = _schedule_factor(
        segment["schedule"],
        segment["epochs"],
        segment["min_factor"],
        segment["start"],
        segment["factor"],
        epoch,
    )
    return _segment(config, epoch, factor)


def likelihood_weight(progress: float, *, start: int, end: int) -> float:
    """The likelihood weight w at ``progress`` epochs: 0 up to start, linear, 1 from end on."""
    if progress >= end:
        return 1.0
    if progress <= start:
        return 0.0
    return (progress - start) / (end - start)


def _stream_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    return (((seed * 1_000_003 + epoch) * 8 + stream) * 4096 + rank) % 2**63


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }


class _Run:
    """One training run: the model, its optimisers, the data on the device, the state."""

    def __init__(
        self,
        model: RectangularFlow,
        train_x: Tensor,
        val_x: Tensor,
        config: TrainConfig,
        run_dir: Path,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.rank, self.world = distributed.rank_and_world()
        self.device = distributed.local_device(config.device)
        self.model = model.to(self.device)
        dtype = next(model.parameters()).dtype
        self.train_x = train_x.to(self.device, dtype)
        self.val_x = val_x.to(self.device, dtype)
        if config.objective == "ts":
            self.optimizers: dict[str, Optimizer] = {
                "f": Adam(model.f.parameters(), lr=config.lr),
                "h": Adam(model.h.parameters(), lr=config.lr),
            }
        else:
            self.optimizers = {"model": Adam(model.parameters(), lr=config.lr)}
        self.state = TrainState()
        self.epoch_samples = 0  # training samples in each epoch's batches (set by epoch())
        self.calibrator = Calibrator()  # the run's method="auto" decisions (auto_calibrate)
        self.calibrating = False  # set by start()
        self.runner: torch.nn.Module = Objective(
            model,
            kind=config.objective,
            beta=config.beta,
            method=config.method,
            probes=config.probes,
            probe_kind=config.probe_kind,
            tol=config.cg_tol,
            max_iter=config.cg_max_iter,
            truncation=None if config.cg_truncation is None else Roulette(**config.cg_truncation),
            chunk_size=config.chunk_size,
        )

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shows(self) -> str | None:
        """What this rank shows on stderr: ``"bars"``, ``"epochs"`` (a line each) or None."""
        progress = self.config.progress
        if not (progress and self.main):
            return None
        if progress == "epochs" or not sys.stderr.isatty():
            return "epochs"
        return "bars"

    def start(self, resume: bool) -> None:
        """Restore the checkpoint, or initialise ActNorm (rank 0) and broadcast; wrap in DDP."""
        checkpoint = self.run_dir / "checkpoint.pt"
        self.model.train()
        if resume:
            self.state = load_checkpoint(
                checkpoint,
                model=self.model,
                optimizers=self.optimizers,
                objective=self.config.objective,
            )
            self.state.session += 1
            self.state.lr_segment = _continue_schedule(
                self.state.lr_segment, self.config, self.state.epoch
            )
        elif checkpoint.exists():
            raise FileExistsError(
                f"run_dir {str(self.run_dir)!r} already holds a checkpoint; pass resume=True to "
                "continue that run, or use a new run_dir"
            )
        else:
            torch.manual_seed(self.config.seed)
            if self.main:
                shuffle = torch.Generator().manual_seed(_stream_seed(self.config.seed, 0, 2))
                index = torch.randperm(len(self.train_x), generator=shuffle)
                self.model.initialize(self.train_x[index[: self.config.init_samples]])
            distributed.broadcast_module(self.model)
            self.state.lr_segment = _segment(self.config, 0, 1.0)
        if self.main:
            lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
            (self.run_dir / "metrics.jsonl").write_text(lines)
        self.start_calibration()
        config = self.config
        partial = config.objective == "ts" or config.warmup_end > 0
        self.runner = distributed.wrap(
            self.runner, device=self.device, find_unused_parameters=partial
        )

    def start_calibration(self) -> None:
        """Switch the run's calibrator on (``auto_calibrate``, the environment switch, or
        decisions saved by the run being resumed), loading the saved decisions."""
        config, saved = self.config, self.state.auto_calibration
        if saved is not None:
            self.calibrator.load_state_dict(saved)
        on = (
            config.method == "auto"
            and config.objective == "ml"
            and (config.auto_calibrate or saved is not None or calibration_requested())
        )
        # Rank 0's setting on every rank: finish_epoch gathers the ranks' decisions.
        self.calibrating = bool(distributed.broadcast_object(on))
        self.runner.auto_calibrate = self.calibrator if self.calibrating else False

    def phase(self, epoch: int) -> str | None:
        if self.config.objective != "ts":
            return None
        return ("manifold", "density")[epoch % 2]

    def step(
        self,
        x: Tensor,
        *,
        batch: int,
        weight: float,
        phase: str | None,
        generator: torch.Generator,
    ) -> tuple[dict[str, Tensor] | None, int]:
        """One optimiser step on this rank's slice x of a batch of ``batch`` samples.

        Returns:
            (parts, singular): the loss parts, scaled so that their mean over the ranks is that
            of the whole batch (None, and no step, when the loss or gradient is not finite or
            every sample of the batch is singular), and the number of samples of the whole
            batch dropped as singular (see :mod:`rnf_fast.training.objectives`).
        """
        names = {None: ["model"], "manifold": ["f"], "density": ["h"]}[phase]
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss, parts = self.runner(x, weight=weight, phase=phase, generator=generator)
        kept, total, singular = len(x), batch, 0
        if "singular" in parts:
            # Each rank's loss is a mean over its kept samples; weighting it by its share of
            # the batch's kept samples needs the count over all ranks before the backward.
            local = int(parts.pop("singular"))
            count = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
            singular = int(distributed.all_reduce_sum(count).item())
            kept, total = kept - local, total - singular
        share = kept * self.world / total if total else 0.0
        # Always backward, even on a non-finite loss or an empty batch: every DDP rank must
        # join the reduction.
        (loss * share).backward()
        if total == 0:
            return None, singular
        params = [
            p
            for name in names
            for group in self.optimizers[name].param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        # Gradients are already averaged over the ranks; the losses are not.
        bad = distributed.all_reduce_sum((~torch.isfinite(loss.detach())).double().reshape(1))
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
        if not bool(torch.isfinite(norm) & (bad == 0)):
            return None, singular
        if self.config.clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.clip, norm)
        for name in names:
            self.optimizers[name].step()
        # A count per step, not a mean over samples: not weighted by the rank's share.
        return {k: v if k == "cg_matvecs" else v * share for k, v in parts.items()}, singular

    def epoch(self, epoch: int) -> dict[str, Any]:
        """Train one epoch; returns its train metrics."""
        config, state = self.config, self.state
        segment = state.lr_segment
        lr = learning_rate(config, epoch, start=segment["start"], start_factor=segment["factor"])
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr
        order = torch.randperm(
            len(self.train_x),
            generator=torch.Generator().manual_seed(_stream_seed(config.seed, epoch, 0)),
        ).to(self.device)
        probes = torch.Generator(device=self.device).manual_seed(
            _stream_seed(config.seed, epoch, 1, self.rank)
        )
        batches = [b for b in order.split(config.batch_size) if len(b) >= self.world]
        phase = self.phase(epoch)
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        skipped = singular = singular_steps = 0
        self.epoch_samples = sum(len(index) for index in batches)
        weight = 0.0
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=self.shows != "bars",
        )
        for i, index in enumerate(bar):
            weight = likelihood_weight(
                epoch + i / len(batches), start=config.warmup_start, end=config.warmup_end
            )
            local = distributed.shard(index)
            parts, dropped = self.step(
                self.train_x[local],
                batch=len(index),
                weight=weight,
                phase=phase,
                generator=probes,
            )
            singular += dropped
            if dropped == len(index):
                singular_steps += 1
                continue
            if parts is None:
                skipped += 1
                state.nonfinite_run += 1
                state.nonfinite_total += 1
                if state.nonfinite_run >= config.max_nonfinite:
                    raise RuntimeError(
                        f"training stopped: {state.nonfinite_run} consecutive steps had a "
                        f"non-finite loss or gradient (epoch {epoch}, step {i}); the model "
                        "keeps its last finite weights. Try a lower lr, clip, a longer "
                        "likelihood warm-up or method='exact'."
                    )
                continue
            state.nonfinite_run = 0
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1
            bar.set_postfix(loss=f"{float(parts['loss']):.4g}")
        if self.world > 1 and sums:
            # Each rank's parts are its share of the batch means: average them over the ranks,
            # so the log shows the whole batches, as one process would.
            keys = sorted(sums)
            stacked = torch.stack([torch.as_tensor(sums[k]).double() for k in keys])
            total = distributed.all_reduce_sum(stacked) / self.world
            sums = dict(zip(keys, total, strict=True))
        record: dict[str, Any] = {
            "epoch": epoch,
            "session": state.session,
            "phase": phase,
            "weight": weight,
        }
        record.update({f"train_{k}": float(v) / counts[k] for k, v in sums.items()})
        record["skipped_steps"] = skipped
        record["singular_skipped"] = singular
        record["singular_steps"] = singular_steps
        record["lr"] = lr
        return record

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """The validation loss -mean log p(x) + β mean ‖x - g(g†(x))‖² with the exact log det
        (``RectangularFlow.log_prob_terms`` in chunks of ``eval_chunk_size`` rows), over the
        samples whose JᵀJ is not numerically singular (``val_singular`` counts those left
        out)."""
        self.model.eval()
        try:
            x = distributed.shard(self.val_x)
            sums = torch.zeros(5, dtype=torch.float64, device=self.device)
            if len(x):
                terms = self.model.log_prob_terms(
                    x, chunk_size=self.config.eval_chunk_size, method="exact", on_singular="nan"
                )
                singular = terms.singular
                columns = (-terms.log_prob, terms.sq_error, terms.logdet)
                if bool(singular.any()):
                    columns = tuple(c[~singular] for c in columns)
                sums[:3] = torch.stack([c.double().sum() for c in columns])
                sums[3] = len(columns[0])
                sums[4] = singular.sum()
            distributed.all_reduce_sum(sums)
        finally:
            self.model.train()
        nll, recon, ld = (sums[:3] / sums[3]).tolist()
        return {
            "val_loss": nll + self.config.beta * recon,
            "val_nll": nll,
            "val_recon": recon,
            "val_logdet": ld,
            "val_singular": int(sums[4]),
        }

    def finish_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Early-stopping bookkeeping, then best model, checkpoint and metrics line (rank 0)."""
        config, state = self.config, self.state
        improved = False
        if epoch >= config.warmup_end:
            loss = record["val_loss"]
            if math.isfinite(loss) and (state.best_val_loss is None or loss < state.best_val_loss):
                state.best_val_loss, state.best_epoch, state.bad_epochs = loss, epoch, 0
                improved = True
            else:
                state.bad_epochs += 1
            patience = config.patience
            state.stopped_early = patience is not None and state.bad_epochs >= patience
        record["best"] = improved
        record = _jsonable(record)
        state.history.append(record)
        state.epoch = epoch + 1
        if self.calibrating:
            # Each rank times its own calls: the decisions merged (rank 0's first) go on in
            # every rank and into the checkpoint.
            states = distributed.all_gather_object(self.calibrator.state_dict())
            state.auto_calibration = merge_calibration_states(states)
            if self.world > 1:
                self.calibrator.load_state_dict(state.auto_calibration)
        if self.main:
            if improved:
                self.model.save(self.run_dir / "best.pt")
            save_checkpoint(
                self.run_dir / "checkpoint.pt",
                model=self.model,
                optimizers=self.optimizers,
                state=state,
                train_config=config.to_dict(),
            )
            with open(self.run_dir / "metrics.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")

    def warn_singular(self, record: Mapping[str, Any]) -> None:
        """One warning for the epoch of ``record`` if it left out singular samples (rank 0)."""
        train, steps = record.get("singular_skipped", 0), record.get("singular_steps", 0)
        val = record.get("val_singular", 0)
        if not (self.main and (train or val)):
            return
        dtype = str(self.train_x.dtype).removeprefix("torch.")
        what = []
        if train:
            what.append(
                f"{train} of the epoch's {self.epoch_samples} training samples were left out "
                "of the loss (it is the mean over the others)"
            )
        if steps:
            what.append(f"{steps} step(s) had no other sample and were skipped")
        if val:
            what.append(
                f"{val} of {len(self.val_x)} validation samples were left out of the val_ metrics"
            )
        warn_at_caller(
            f"epoch {record['epoch']}: JᵀJ is numerically singular for some samples (the "
            f"decoder's Jacobian is rank deficient to {dtype} precision there, so their log "
            "det is rounding error that would reward a collapsing manifold): "
            + "; ".join(what)
            + ". A few now and then are harmless; many, or more each epoch, mean the manifold "
            "is collapsing: lower lr, lengthen the likelihood warm-up (warmup_end), raise "
            "beta, or train in float64. metrics.jsonl counts them per epoch (singular_skipped, "
            "singular_steps, val_singular)."
        )

    def finish(self) -> TrainHistory:
        """Restore the best weights if asked, save the final model; the run's history."""
        config, state = self.config, self.state
        distributed.barrier()
        if config.restore_best and state.best_epoch is not None:
            best = load_payload(self.run_dir / "best.pt", kind=MODEL_FORMAT, version=MODEL_VERSION)
            load_state(self.model, best["state_dict"], what="the best model")
        if self.main:
            self.model.save(self.run_dir / "model.pt")
        if state.stopped_early:
            reason = f"early stopping: no lower validation loss in {config.patience} epochs"
        else:
            reason = f"completed {state.epoch} epochs"
        return TrainHistory(
            records=list(state.history),
            best_epoch=state.best_epoch,
            best_val_loss=state.best_val_loss,
            stop_reason=reason,
            nonfinite_steps=state.nonfinite_total,
        )


def train(
    model: RectangularFlow,
    train_x: Tensor,
    val_x: Tensor,
    config: TrainConfig | Mapping[str, Any],
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
) -> TrainHistory:
    """Train ``model`` in place on train_x, with early stopping on val_x; see the module docs.

    Under an initialised process group (see :mod:`rnf_fast.training.distributed`) every rank
    calls this with the same arguments and data; the ranks share each batch.

    Arguments:
        model: the rectangular flow (moved to ``config.device``; its dtype is kept and the
            data are cast to it).
        train_x: (N, D) finite training data.
        val_x: (M, D) finite validation data.
        config: a :class:`TrainConfig`, or a mapping of its fields.
        run_dir: the run folder (created if missing, by rank 0: the other ranks write nothing).
        resume: continue the run whose checkpoint is in run_dir; without it a run_dir that
            already holds a checkpoint is refused. ``epochs`` may differ from the saved run's
            (the learning rate continues without a jump: ``lr_schedule`` of
            :class:`TrainConfig`); the epochs it trains are a new ``session``.

    Returns:
        :class:`TrainHistory`.

    Warns:
        RuntimeWarning: once per epoch that left singular samples out of the loss or the
            validation metrics (see the module docstring).

    Raises:
        ValueError: bad data or options; FileExistsError: see ``resume``;
        CheckpointError: a corrupt or mismatched checkpoint; RuntimeError: ``max_nonfinite``
        consecutive non-finite steps.
    """
    if not isinstance(model, RectangularFlow):
        raise TypeError(f"model must be a RectangularFlow, got {type(model).__name__}")
    if not isinstance(config, TrainConfig):
        config = TrainConfig.from_dict(config)
    check_rows("train_x", train_x, model.D, what="D")
    check_rows("val_x", val_x, model.D, what="D")
    run_dir = Path(run_dir)
    run = _Run(model, train_x, val_x, config, run_dir)
    if run.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    run.start(resume)
    epochs = tqdm(
        range(run.state.epoch, config.epochs),
        initial=run.state.epoch,
        total=config.epochs,
        desc="train",
        disable=run.shows != "bars",
    )
    with warnings.catch_warnings():
        # The run counts singular samples itself (run.warn_singular, once per epoch): the
        # engine's and the model's warnings per call are silenced.
        warnings.filterwarnings("ignore", message=SINGULAR_WARNING, category=RuntimeWarning)
        for epoch in epochs:
            if run.state.stopped_early:
                break
            started = time.perf_counter()
            record = run.epoch(epoch)
            record.update(run.validate())
            record["seconds"] = time.perf_counter() - started
            run.finish_epoch(epoch, record)
            run.warn_singular(record)
            epochs.set_postfix(val_loss=f"{record['val_loss']:.4g}")
            if run.shows == "epochs":
                print(_epoch_line(record, config.epochs), file=sys.stderr, flush=True)
    return run.finish()


def _epoch_line(record: Mapping[str, Any], epochs: int) -> str:
    """One line of progress for a log: the epoch, its train loss, validation metrics and time."""

    def number(key: str) -> str:
        value = record.get(key)
        return "nan" if value is None else f"{value:.4g}"

    line = (
        f"epoch {record['epoch'] + 1}/{epochs}: train loss {number('train_loss')}, "
        f"val loss {number('val_loss')} (nll {number('val_nll')}, recon {number('val_recon')})"
    )
    if record.get("skipped_steps"):
        line += f", {record['skipped_steps']} steps skipped"
    if record.get("singular_skipped") or record.get("val_singular"):
        line += (
            f", singular samples left out: {record.get('singular_skipped', 0)} train, "
            f"{record.get('val_singular', 0)} val"
        )
    if record.get("best"):
        line += ", best"
    return line + f", {record['seconds']:.3g} s"
