"""The trainer: exact resumption, resume sessions, the learning rate across a resume that extends
the run, metrics log, early stopping after the warm-up, non-finite steps, and clear errors for
bad options, data and checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

import rnf_fast.models.serialization as serialization
import rnf_fast.training.trainer as trainer
from rnf_fast.engine import api, calibrate
from rnf_fast.models import CheckpointError, FlowConfig, RectangularFlow
from rnf_fast.training import Objective, TrainConfig, likelihood_weight, train
from rnf_fast.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

DTYPE = torch.float64
MODEL = FlowConfig(D=3, d=1, f_layers=2, f_hidden=(8,), h_layers=1)


def helix(n: int, *, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    t = 3 * torch.rand(n, generator=generator, dtype=DTYPE)
    noise = 0.01 * torch.randn(n, 3, generator=generator, dtype=DTYPE)
    return torch.stack([t.cos(), t.sin(), 0.3 * t], dim=1) + noise


TRAIN, VAL = helix(96, seed=0), helix(32, seed=1)


def options(**changes) -> dict:
    base = {"epochs": 2, "batch_size": 32, "lr": 1e-2, "progress": False, "method": "exact"}
    return {**base, **changes}


def new_model(config: FlowConfig = MODEL) -> RectangularFlow:
    return RectangularFlow(config).to(DTYPE)


def fit(run_dir, *, model=None, resume=False, **changes):
    model = new_model() if model is None else model
    return model, train(model, TRAIN, VAL, options(**changes), run_dir, resume=resume)


def without_time(records):
    """The records without what differs between an uninterrupted and a resumed run."""
    return [{k: v for k, v in r.items() if k not in ("seconds", "session")} for r in records]


def log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "changes",
    [
        {"objective": "ml", "method": "cg", "probes": 2, "warmup_end": 1, "clip": 5.0},
        {"objective": "ts"},
    ],
    ids=["ml-cg-warmup", "ts"],
)
def test_resume_continues_exactly_where_the_run_stopped(tmp_path, changes):
    changes = {**changes, "restore_best": False}
    straight, history = fit(tmp_path / "straight", **changes)
    fit(tmp_path / "split", epochs=1, **changes)
    resumed, resumed_history = fit(tmp_path / "split", resume=True, **changes)
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), key
    assert without_time(resumed_history.records) == without_time(history.records)
    assert without_time(log(tmp_path / "split")) == without_time(history.records)
    assert [r["session"] for r in resumed_history.records] == [0, 1]


def test_each_resume_that_trains_starts_a_session(tmp_path):
    fit(tmp_path, epochs=1)
    fit(tmp_path, epochs=2, resume=True)
    fit(tmp_path, epochs=2, resume=True)  # nothing left to train: no epoch, no new session
    _, history = fit(tmp_path, epochs=3, resume=True)
    assert [(r["epoch"], r["session"]) for r in log(tmp_path)] == [(0, 0), (1, 1), (2, 2)]
    assert [r["session"] for r in history.records] == [0, 1, 2]
    payload = serialization.load_payload(
        tmp_path / "checkpoint.pt", kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION
    )
    assert payload["state"]["session"] == 2  # kept in the checkpoint, so it survives


COSINE = {"lr": 1e-2, "lr_schedule": "cosine", "lr_min_factor": 0.1}


def assert_no_jump_up(lrs: list[float]) -> None:
    assert all(b <= a * (1 + 1e-12) for a, b in zip(lrs, lrs[1:])), lrs


def test_extending_a_finished_cosine_run_keeps_its_final_learning_rate(tmp_path):
    fit(tmp_path, epochs=3, **COSINE)
    _, history = fit(tmp_path, epochs=6, resume=True, **COSINE)
    lrs = [r["lr"] for r in history.records]
    assert lrs[:3] == [trainer.learning_rate(TrainConfig(epochs=3, **COSINE), e) for e in range(3)]
    assert lrs[2] == pytest.approx(1e-3)  # the first run ended at its minimum ...
    assert lrs[3:] == [lrs[2]] * 3  # ... and the extension continues there (was 1e-3 -> 4.3e-3)


def interrupted(run_dir, monkeypatch, *, after: int, **changes) -> None:
    """A run killed once epoch ``after`` is saved."""
    finish_epoch = trainer._Run.finish_epoch

    def killed(self, epoch, record):
        finish_epoch(self, epoch, record)
        if epoch == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer._Run, "finish_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(run_dir, **changes)
    monkeypatch.undo()


def test_a_cosine_run_resumed_with_the_same_epochs_is_the_uninterrupted_one(tmp_path, monkeypatch):
    changes = {"epochs": 3, "restore_best": False, **COSINE}
    straight, history = fit(tmp_path / "straight", **changes)
    interrupted(tmp_path / "split", monkeypatch, after=0, **changes)
    resumed, resumed_history = fit(tmp_path / "split", resume=True, **changes)
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), key
    assert without_time(resumed_history.records) == without_time(history.records)


def test_an_interrupted_cosine_run_extended_decays_from_where_it_stopped(tmp_path, monkeypatch):
    interrupted(tmp_path, monkeypatch, after=1, epochs=6, **COSINE)
    _, history = fit(tmp_path, epochs=9, resume=True, **COSINE)
    lrs = [r["lr"] for r in history.records]
    six = [trainer.learning_rate(TrainConfig(epochs=6, **COSINE), e) for e in range(6)]
    assert lrs[:2] == six[:2]
    assert lrs[2] == pytest.approx(six[2], rel=1e-12)  # resumes where the old schedule was
    assert lrs[3] > six[3]  # then decays over the longer run
    assert_no_jump_up(lrs)
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-12)  # and ends at the minimum


def test_a_checkpoint_without_session_or_schedule_resumes(tmp_path):
    """Checkpoints written before ``session``, ``lr_segment`` and ``auto_calibration``: session 0,
    the schedule of their saved options, no calibrated decisions."""
    fit(tmp_path, epochs=3, **COSINE)
    path = tmp_path / "checkpoint.pt"
    payload = serialization.load_payload(path, kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    for key in ("session", "lr_segment", "auto_calibration"):
        del payload["state"][key]
    serialization.atomic_save(payload, path)
    _, history = fit(tmp_path, epochs=4, resume=True, **COSINE)
    assert history.records[-1]["session"] == 1
    assert history.records[-1]["lr"] == history.records[-2]["lr"] == pytest.approx(1e-3)


CALIBRATED = {"epochs": 3, "method": "auto", "auto_calibrate": True, "batch_size": 16}


def timed_estimators(monkeypatch) -> list[str]:
    """The trainer's calibrator on a fake clock in ms that only the log det's estimators move:
    exact costs 5, CG 1 (the fitted model picks exact at d = 1). Returns the methods the
    training steps run (the validation's exact log det, under no_grad, is left out)."""
    ran: list[str] = []
    now = [0.0]

    def instrumented(name, cost, estimate):
        def run(options, ctx):
            if ctx.need_grad:
                ran.append(name)
            now[0] += cost
            return estimate(options, ctx)

        return run

    monkeypatch.setattr(calibrate, "device_clock", lambda device: now[0])
    monkeypatch.setattr(api, "estimate_exact", instrumented("exact", 5.0, api.estimate_exact))
    monkeypatch.setattr(api, "estimate_cg", instrumented("cg", 1.0, api.estimate_cg))
    monkeypatch.delenv(calibrate.CALIBRATE_ENV, raising=False)
    return ran


def forbidden_clock(device):
    raise AssertionError("the resumed run timed the methods again")


def checkpoint_state(run_dir) -> dict:
    path = run_dir / "checkpoint.pt"
    return serialization.load_payload(path, kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)[
        "state"
    ]


@pytest.mark.parametrize(
    ("after", "resumed_runs"),
    [(1, ["cg"] * 6), (0, ["exact", "cg"] + ["cg"] * 10)],
    ids=["decided", "under-way"],
)
def test_a_resumed_run_makes_the_calibrated_choices_of_the_checkpoint(
    tmp_path, monkeypatch, after, resumed_runs
):
    # 6 steps an epoch; the first 8 run exact and CG in turn (1 warm-up and 3 timed calls of
    # each), then CG, timed faster, runs.
    ran = timed_estimators(monkeypatch)
    straight, history = fit(tmp_path / "straight", **CALIBRATED)
    assert ran == ["exact", "cg"] * 4 + ["cg"] * 10
    saved = checkpoint_state(tmp_path / "straight")["auto_calibration"]["entries"]
    assert list(saved.values()) == [{"method": "cg", "exact_ms": 5.0, "cg_ms": 1.0}]
    assert "/B=16/d=1/" in next(iter(saved))
    # Interrupted after epoch `after`: decided (after 1), or 6 of the 8 calls timed (after 0).
    ran.clear()
    interrupted(tmp_path / "split", monkeypatch, after=after, **CALIBRATED)
    assert ran == (["exact", "cg"] * 4 + ["cg"] * 4 if after else ["exact", "cg"] * 3)
    ran = timed_estimators(monkeypatch)
    if after:
        monkeypatch.setattr(calibrate, "device_clock", forbidden_clock)
    resumed, resumed_history = fit(tmp_path / "split", resume=True, **CALIBRATED)
    # The resumed run goes on with the saved decision (no timing) or the saved timings (the
    # last two calls): the same methods at the same steps, so the same run, bit for bit.
    assert ran == resumed_runs
    for (key, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), key
    assert without_time(resumed_history.records) == without_time(history.records)
    assert checkpoint_state(tmp_path / "split")["auto_calibration"]["entries"] == saved


def test_run_folder_holds_log_checkpoint_and_loadable_models(tmp_path):
    model, history = fit(tmp_path, epochs=3, warmup_start=0, warmup_end=2)
    records = log(tmp_path)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert [(r["session"], r["singular_skipped"], r["val_singular"]) for r in records] == [
        (0, 0, 0)
    ] * 3
    assert records[0]["weight"] < 1 and records[2]["weight"] == 1.0
    assert "train_logdet" in records[0] and math.isfinite(records[0]["val_nll"])
    assert history.best_epoch == 2  # the only epoch after the warm-up
    assert history.stop_reason == "completed 3 epochs"
    for name in ("best.pt", "model.pt"):
        loaded = RectangularFlow.load(tmp_path / name).eval()
        torch.testing.assert_close(loaded.log_prob(VAL), model.eval().log_prob(VAL))


def test_early_stopping_counts_from_the_end_of_the_warmup(tmp_path, monkeypatch):
    val_losses = iter([0.0, 5.0, 4.0, 4.5, 4.6, 4.7, 4.8])
    validated = []  # the weights each validation saw

    def fake_validate(self):
        validated.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return {"val_loss": next(val_losses)}

    monkeypatch.setattr(trainer._Run, "validate", fake_validate)
    model, history = fit(tmp_path, epochs=7, warmup_end=1, patience=2)
    assert history.best_epoch == 2 and history.best_val_loss == 4.0
    assert len(history.records) == 5
    assert history.stop_reason.startswith("early stopping")
    best = RectangularFlow.load(tmp_path / "best.pt")
    for (key, p), q in zip(best.state_dict().items(), model.state_dict().values()):
        assert torch.equal(p, q), key
    # best.pt holds the weights of epoch 2, which differ from those of the last epoch.
    assert len(validated) == 5
    assert any(not torch.equal(p, validated[-1][k]) for k, p in validated[2].items())
    for key, p in best.state_dict().items():
        assert torch.equal(p, validated[2][key]), key


def nan_every(monkeypatch, period: int) -> None:
    forward = Objective.forward
    calls = iter(range(10**6))

    def flaky(self, x, **kwargs):
        loss, parts = forward(self, x, **kwargs)
        return (loss * math.nan if next(calls) % period == 0 else loss), parts

    monkeypatch.setattr(Objective, "forward", flaky)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_every(monkeypatch, 2)
    model, history = fit(tmp_path, epochs=2)
    assert history.nonfinite_steps == 3 and [r["skipped_steps"] for r in history.records] == [2, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nonfinite_steps_stop_with_a_clear_error(tmp_path, monkeypatch):
    nan_every(monkeypatch, 1)
    model = new_model()
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite loss"):
        fit(tmp_path, model=model, max_nonfinite=3)
    initial = new_model()
    initial.initialize(TRAIN)  # no step was taken: the model is as initialised
    for p, q in zip(model.parameters(), initial.parameters()):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


def test_likelihood_weight_ramps_linearly():
    weights = [likelihood_weight(t, start=1, end=3) for t in (0.0, 1.0, 1.5, 2.0, 3.0, 7.0)]
    assert weights == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    assert likelihood_weight(0.0, start=0, end=0) == 1.0


def test_checkpoint_problems_raise_clear_errors(tmp_path):
    fit(tmp_path, epochs=1)
    with pytest.raises(FileExistsError, match="already holds a checkpoint; pass resume=True"):
        fit(tmp_path, epochs=1)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        fit(tmp_path / "empty", resume=True)
    other = new_model(FlowConfig(**{**MODEL.to_dict(), "f_hidden": (9,)}))
    with pytest.raises(CheckpointError, match=r"different model config.*f_hidden"):
        fit(tmp_path, model=other, resume=True)
    with pytest.raises(CheckpointError, match="objective 'ml', resuming with 'ts'"):
        fit(tmp_path, resume=True, objective="ts")
    with pytest.raises(
        CheckpointError, match="holds torch.float64 weights .* model is torch.float32"
    ):
        fit(tmp_path, model=RectangularFlow(MODEL), resume=True)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        fit(tmp_path, resume=True)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"objective": "vae"}, "objective must be one of"),
        ({"method": "dense"}, "method must be one of"),
        (
            {"auto_calibrate": True},
            "auto_calibrate applies to method='auto' only, got method='exact'",
        ),
        ({"method": "auto", "auto_calibrate": 1}, "auto_calibrate must be True or False, got 1"),
        ({"warmup_start": 3, "warmup_end": 1}, "warmup_end must be >= warmup_start = 3"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"patience": 0}, "patience must be an integer >= 1"),
        ({"learning_rate": 1.0}, r"unknown TrainConfig option\(s\) \['learning_rate'\]"),
        ({"device": "tpu:x"}, "device must be"),
    ],
)
def test_bad_options_raise(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        fit(tmp_path, **changes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_raises():
    with pytest.raises(ValueError, match="CUDA is not available"):
        TrainConfig(device="cuda")


def test_bad_data_raise(tmp_path):
    model = new_model()
    bad = TRAIN.clone()
    bad[5, 0] = math.inf
    with pytest.raises(ValueError, match="train_x contains NaN or Inf in 1 of 96 rows"):
        train(model, bad, VAL, options(), tmp_path)
    with pytest.raises(ValueError, match=r"val_x must be \(N, D\) = \(N, 3\)"):
        train(model, TRAIN, VAL[:, :2], options(), tmp_path)
    with pytest.raises(TypeError, match="model must be a RectangularFlow"):
        train(torch.nn.Linear(3, 3), TRAIN, VAL, options(), tmp_path)


def test_cosine_learning_rate_schedule():
    from rnf_fast.training.trainer import TrainConfig, learning_rate

    cfg = TrainConfig(lr=1e-2, epochs=5, lr_schedule="cosine", lr_min_factor=0.1, progress=False)
    lrs = [learning_rate(cfg, e) for e in range(5)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert learning_rate(TrainConfig(lr=3e-3, progress=False), 7) == 3e-3
    with pytest.raises(ValueError, match="lr_schedule must be"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="lr_min_factor"):
        TrainConfig(lr_min_factor=0.0)
