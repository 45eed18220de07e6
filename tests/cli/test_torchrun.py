"""``rnf-fast train`` under torchrun: the README's command, with 2 CPU processes (gloo), joins
one process group, writes one run folder from rank 0 and trains what one process trains on the
whole batches; and no flag of ``train`` but the alias ``--d`` trips torchrun's own parser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rnf_fast.cli import _TRAIN_FLAGS, build_parser, main

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

# 256 rows in batches of 64: every batch splits into two halves of 32, so the mean loss of each
# half, averaged over the ranks by DDP, has the gradient of the whole batch's mean loss.
TINY = {
    "data": {"n_train": 256, "n_val": 64, "n_test": 64},
    "model": {"f_layers": 1, "f_hidden": [8], "h_layers": 1},
    "train": {"epochs": 2, "batch_size": 64, "warmup_end": 0, "method": "exact", "lr": 1e-2},
}


def _torchrun() -> list[str]:
    """torchrun beside this Python (the venv's), else the module it runs."""
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def test_readme_torchrun_command_trains_one_run_like_one_process(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    ddp = tmp_path / "ddp"
    # The README's command: torchrun --standalone --nproc-per-node 2 -m rnf_fast.cli train ...
    command = [
        *_torchrun(),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "rnf_fast.cli",
        "train",
        "--config",
        str(config),
        "--run-dir",
        str(ddp),
        "--latent-dim",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One set of files: each epoch logged once, the results printed once (by rank 0).
    epochs = [
        json.loads(line)["epoch"] for line in (ddp / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [0, 1]
    assert proc.stdout.count("run folder:") == 1, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "tiny.json"]
    # Rank 0 alone printed epoch lines (stderr is a pipe here: one line per epoch).
    assert [
        line.split(":")[0] for line in proc.stderr.splitlines() if line.startswith("epoch")
    ] == [
        "epoch 1/2",
        "epoch 2/2",
    ], proc.stderr

    one = tmp_path / "one"
    assert main(["train", "--config", str(config), "--run-dir", str(one), "--latent-dim", "1"]) == 0
    got = json.loads((ddp / "results.json").read_text())
    want = json.loads((one / "results.json").read_text())
    assert got.keys() == want.keys()
    # float32 models: the two ranks sum the gradient in another order than one process does, so
    # the weights agree to rounding (measured: 9e-8 after 8 Adam steps at lr 1e-2), not bit for
    # bit; the logged train means are those of the whole batches (averaged over the ranks).
    ddp_state = torch.load(ddp / "model.pt", weights_only=True)["state_dict"]
    one_state = torch.load(one / "model.pt", weights_only=True)["state_dict"]
    for key, value in one_state.items():
        torch.testing.assert_close(ddp_state[key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key in ("nll", "recon_error", "frechet"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    logs = [
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (ddp, one)
    ]
    for ddp_record, one_record in zip(*logs, strict=True):
        for key in ("train_loss", "train_recon", "val_loss"):
            assert ddp_record[key] == pytest.approx(one_record[key], rel=1e-5), key


def test_every_train_flag_but_the_d_alias_passes_torchrun_parser():
    """torchrun's parser rejects options that abbreviate several of its own, wherever they
    stand on its command line: --d (--duplicate-stdout-filters, ...) does, --latent-dim not."""
    from torch.distributed.run import get_args_parser

    launcher = get_args_parser()
    flags = [
        flag
        for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    ]
    assert "--latent-dim" in flags and "--d" in flags
    rejected = []
    for flag in flags:
        try:
            launcher.parse_args(["-m", "rnf_fast.cli", "train", flag, "1"])
        except SystemExit:
            rejected.append(flag)
    assert rejected == ["--d"]
    assert {flags for flags, *_ in _TRAIN_FLAGS if "--d" in flags} == {("--latent-dim", "--d")}
