"""Checkpoints are written atomically: a run killed while saving keeps its previous checkpoint,
and resuming from it works."""

from __future__ import annotations

import pytest
import torch

import rnf_fast.models.serialization as serialization
from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.training import train
from rnf_fast.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

DTYPE = torch.float64
MODEL = FlowConfig(D=3, d=2, f_layers=1, f_hidden=(8,), h_layers=1, h_hidden=(8,))
X = torch.randn(48, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)


def fit(run_dir, *, epochs: int, resume: bool = False):
    model = RectangularFlow(MODEL).to(DTYPE)
    options = {"epochs": epochs, "batch_size": 16, "method": "exact", "progress": False}
    return train(model, X[:32], X[32:], options, run_dir, resume=resume)


def test_a_kill_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    fit(tmp_path, epochs=1)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def killed(payload, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(serialization.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path, epochs=2, resume=True)
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    payload = serialization.load_payload(
        tmp_path / "checkpoint.pt", kind=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION
    )
    assert payload["state"]["epoch"] == 1
    history = fit(tmp_path, epochs=2, resume=True)
    assert [r["epoch"] for r in history.records] == [0, 1]
