"""Run folders and the rnf-fast command: train, resume, eval, sample, config files, errors."""

import json

import numpy as np
import pytest
import torch

from rnf_fast.cli import main
from rnf_fast.runs import load_config_file, resolve_config, sample_run, train_run

TINY = {
    "data": {"n_train": 256, "n_val": 64, "n_test": 64},
    "model": {"f_layers": 1, "f_hidden": [8], "h_layers": 1},
    "train": {"epochs": 2, "batch_size": 64, "progress": False, "warmup_end": 0},
}


def test_resolve_config_layers_preset_file_and_flags():
    cfg = resolve_config(
        "vonmises",
        file_config={"train": {"epochs": 7, "lr": 0.01}, "model": {"f_layers": 3}},
        overrides={"train": {"epochs": 9}},
    )
    assert cfg["dataset"] == "vonmises"
    assert cfg["train"]["epochs"] == 9 and cfg["train"]["lr"] == 0.01
    assert cfg["model"]["f_layers"] == 3 and cfg["model"]["f_coupling"] == "affine"


def test_config_files(tmp_path):
    (tmp_path / "a.toml").write_text('dataset = "vmf-sphere"\n[train]\nepochs = 3\n')
    assert load_config_file(tmp_path / "a.toml")["train"]["epochs"] == 3
    (tmp_path / "b.json").write_text(json.dumps({"trian": {}}))
    with pytest.raises(ValueError, match="unknown config section"):
        load_config_file(tmp_path / "b.json")
    (tmp_path / "c.yaml").write_text("x: 1")
    with pytest.raises(ValueError, match=".json or .toml"):
        load_config_file(tmp_path / "c.yaml")
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.toml")


def test_train_eval_sample_and_resume(tmp_path):
    run = tmp_path / "run"
    results = train_run(resolve_config("vonmises", file_config=TINY), run)
    for name in (
        "config.json",
        "model.pt",
        "results.json",
        "metrics.jsonl",
        "manifold.png",
        "curves.png",
    ):
        assert (run / name).exists(), name
    assert abs(results["entropy"] - 1.6274) < 1e-3 and np.isfinite(results["nll"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # A second train into the same folder needs --resume; resuming to 3 epochs adds one.
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train_run(resolve_config("vonmises", file_config=TINY), run)
    more = resolve_config("vonmises", file_config=TINY, overrides={"train": {"epochs": 3}})
    changed = resolve_config("vonmises", file_config=TINY, overrides={"train": {"lr": 0.5}})
    with pytest.raises(ValueError, match=r"these differ: train.lr \(0.5, saved 0.0003\)"):
        train_run(changed, run, resume=True)
    train_run(more, run, resume=True)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    x = sample_run(run, 5)
    assert x.shape == (5, 2) and torch.isfinite(x).all()
    assert main(["eval", str(run)]) == 0
    out = tmp_path / "s.npy"
    assert main(["sample", str(run), "-n", "7", "--out", str(out)]) == 0
    assert np.load(out).shape == (7, 2)


def test_cli_train_with_flags_and_standardizer(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    run = tmp_path / "sphere"
    code = main(
        [
            "train",
            "--dataset",
            "vmf-sphere",
            "--config",
            str(cfg),
            "--run-dir",
            str(run),
            "--epochs",
            "1",
            "--standardize",
            "global",
            "--method",
            "cg",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "test NLL" in out and "recon" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["method"] == "cg" and saved["standardize"] == "global"
    assert (run / "standardizer.pt").exists() and (run / "manifold.png").exists()


def test_cli_errors(tmp_path, capsys):
    # argparse's usage errors: exit status 2 and a message that names the bad value.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "svd"])
    assert exit_info.value.code == 2
    assert "argument --method: invalid choice: 'svd'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--f-hidden", "64,x"])
    assert exit_info.value.code == 2
    assert "expected comma-separated integers, got '64,x'" in capsys.readouterr().err
    # Found after parsing, reported alike: one line, exit status 2 (see test_errors.py).
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--resume"])
    assert exit_info.value.code == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sample_run(tmp_path, 0)
    with pytest.raises(ValueError, match="standardize must be"):
        resolve_config("vonmises", overrides={"standardize": "minmax"})
