"""Your own files from the command line (--train / --val / --test, eval --data), resume from the
run folder alone, runs evaluated and resumed from any directory or with moved data, failed
resumes that change nothing, and train / eval without matplotlib."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rnf_fast.cli import main
from rnf_fast.data import load_dataset

from .errors import usage_error

# Not the defaults (8 couplings of 64-64, 30 epochs, ...): a resume that rebuilt the
# configuration from the defaults instead of config.json would differ from this run.
TINY = {
    "model": {"f_layers": 1, "f_hidden": [8], "h_layers": 1},
    "train": {"epochs": 2, "batch_size": 64, "warmup_end": 0, "method": "exact"},
}


def curve(n: int, seed: int) -> np.ndarray:
    """n points of a closed curve in R^3 (d = 1)."""
    t = np.random.default_rng(seed).vonmises(0.0, 2.0, n)
    return np.stack([np.cos(t), np.sin(t), 0.5 * np.cos(2 * t)], 1)


@pytest.fixture
def files(tmp_path):
    """train.npy (200 rows), val.csv (40, with a header), test.npy (60) and tiny.json."""
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "train.npy", curve(200, 0))
    np.savetxt(folder / "val.csv", curve(40, 1), delimiter=",", header="x,y,z", comments="")
    np.save(folder / "test.npy", curve(60, 2))
    (folder / "tiny.json").write_text(json.dumps(TINY))
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def train_files(files: Path, run: Path, *extra: str) -> list[str]:
    """``rnf-fast train`` on files/train.npy, by the flags that existed before --train (the
    tests of resume and eval then fail on the old behaviour, not on a missing flag)."""
    return [
        "train",
        "--dataset",
        "npy",
        "--root",
        str(files / "train.npy"),
        "--latent-dim",
        "1",
        "--config",
        str(files / "tiny.json"),
        "--run-dir",
        str(run),
        *extra,
    ]


def test_splits_are_the_documented_ones(files):
    """--train alone: default_rng(--data-seed) shuffles the rows, the first round(N/10) are
    validation, the next round(N/10) test, the rest train; a --val or --test file replaces its
    cut (and nothing is cut from train for it)."""
    x = torch.from_numpy(np.load(files / "train.npy"))
    order = torch.from_numpy(np.random.default_rng(3).permutation(200))
    ds = load_dataset("npy", root=files / "train.npy", seed=3, dtype=torch.float64)
    assert torch.equal(ds.val, x[order[:20]]) and torch.equal(ds.test, x[order[20:40]])
    assert torch.equal(ds.train, x[order[40:]])
    test = torch.from_numpy(np.load(files / "test.npy"))
    ds = load_dataset(
        "npy", root=files / "train.npy", test_file=files / "test.npy", seed=3, dtype=torch.float64
    )
    assert torch.equal(ds.test, test) and torch.equal(ds.val, x[order[:20]])
    assert torch.equal(ds.train, x[order[20:]])  # 90 / 10: only validation is cut
    both = {"val_file": files / "val.csv", "test_file": files / "test.npy"}
    ds = load_dataset("npy", root=files / "train.npy", seed=3, **both)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (200, 40, 60)
    with pytest.raises(ValueError, match="n_test does not apply with test_file"):
        load_dataset("npy", root=files / "train.npy", test_file=files / "test.npy", n_test=5)


def test_train_with_val_and_test_files(files, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--train", str(files / "train.npy"), "--val", str(files / "val.csv")]
    argv += ["--test", str(files / "test.npy"), "--latent-dim", "1"]
    assert main([*argv, "--config", str(files / "tiny.json"), "--run-dir", str(run)]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["n_test"] == 60  # the whole test file, not a cut of train.npy
    saved = json.loads((run / "config.json").read_text())
    assert saved["dataset"] == "npy"
    # Stored as given and resolved.
    assert saved["data"]["test_file"] == str(files / "test.npy")
    assert saved["data_paths"]["val_file"] == str((files / "val.csv").resolve())
    assert "test NLL" in capsys.readouterr().out
    # D = 3 with d = 1 has no 2-D or 3-D picture of its own: the principal-axes projection.
    if importlib.util.find_spec("matplotlib") is not None:
        assert (run / "manifold.png").exists() and (run / "curves.png").exists()


def test_bad_file_flags_are_one_line_errors_naming_the_flag(files, tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "x.txt").write_text("1,2\n")
    np.save(tmp_path / "wide.npy", np.zeros((10, 5)))
    line = usage_error(["train", "--train", str(tmp_path / "x.txt")], capsys)
    assert "argument --train: expected a .npy or .csv file" in line
    assert "argument --test: no such file" in usage_error(["train", "--test", "no.npy"], capsys)
    line = usage_error(["train", "--test", str(files / "test.npy")], capsys)
    assert "--test needs the training data from a file" in line
    line = usage_error(train_files(files, run, "--test", str(tmp_path / "wide.npy")), capsys)
    assert "has D = 5 columns, but the training file has D = 3 (--test must match" in line
    line = usage_error(["train", "--train", str(files / "train.npy"), "--root", "x.npy"], capsys)
    assert "--train FILE stands for --dataset npy|csv --root FILE" in line
    assert not run.exists()


def test_eval_on_another_file(files, tmp_path, capsys):
    """eval --data: NLL with its standard error next to the reconstruction error and the
    Fréchet distance, printed and written to RUN/eval-NAME.json; a file of another width is
    a one-line error that names --data."""
    run = tmp_path / "run"
    assert main(train_files(files, run)) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(files / "val.csv")]) == 0
    out = capsys.readouterr().out
    assert "val.csv: 40 rows of D = 3" in out and "±" in out and "recon MSE" in out
    written = json.loads((run / "eval-val.csv.json").read_text())
    assert written["n_test"] == 40 and written["data_file"] == str(files / "val.csv")
    for key in ("nll", "nll_se", "recon_error", "frechet"):
        assert np.isfinite(written[key]), key
    assert "entropy" not in written  # data from files: no known truth
    np.save(tmp_path / "wide.npy", np.zeros((10, 5)))
    line = usage_error(["eval", str(run), "--data", str(tmp_path / "wide.npy")], capsys)
    assert "--data: " in line and "has D = 5 columns" in line and "trained on D = 3" in line
    line = usage_error(["eval", str(run), "--data", str(files / "val.csv"), "--root", "x"], capsys)
    assert "--data evaluates on that file alone" in line


def test_eval_data_knows_the_true_entropy_of_a_synthetic_run(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({**TINY, "data": {"n_train": 128, "n_val": 32, "n_test": 32}}))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    x = load_dataset("vonmises", n_train=128, n_val=32, n_test=50, seed=9).test.numpy()
    np.save(tmp_path / "more.npy", x)
    assert main(["eval", str(run), "--data", str(tmp_path / "more.npy")]) == 0
    written = json.loads((run / "eval-more.npy.json").read_text())
    assert abs(written["entropy"] - 1.6274) < 1e-3 and written["n_test"] == 50
    assert "true entropy 1.6274" in capsys.readouterr().out


def test_resume_with_run_dir_and_resume_alone(files, tmp_path, capsys):
    """The saved configuration is the default: --run-dir X --resume continues it (it used to
    fail unless every flag of the first run was repeated), --epochs extends it."""
    run = tmp_path / "run"
    assert main(train_files(files, run)) == 0
    assert main(["train", "--run-dir", str(run), "--resume", "--epochs", "3"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 3
    assert main(["train", "--run-dir", str(run), "--resume"]) == 0  # nothing left: evaluates
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


def test_auto_calibrate_timings_are_saved_and_resumed(files, tmp_path, capsys):
    """--auto-calibrate: config.json keeps it, the checkpoint the timings per batch shape (160
    training rows in batches of 64: 2 steps of B = 64 and one of B = 32 an epoch, too few to
    decide), and a resume goes on from them (started afresh, it would count 2 calls of B = 64,
    not 6)."""
    run = tmp_path / "run"
    assert main(train_files(files, run, "--method", "auto", "--auto-calibrate")) == 0
    assert json.loads((run / "config.json").read_text())["train"]["auto_calibrate"] is True

    def calls() -> dict[str, int]:
        state = torch.load(run / "checkpoint.pt", weights_only=True)["state"]
        entries = state["auto_calibration"]["entries"]
        return {key.split("/")[1]: entry["calls"] for key, entry in entries.items()}

    assert calls() == {"B=64": 4, "B=32": 2}
    assert main(["train", "--run-dir", str(run), "--resume", "--epochs", "3"]) == 0
    assert calls() == {"B=64": 6, "B=32": 3}


def test_failed_resume_changes_nothing(files, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_files(files, run)) == 0
    capsys.readouterr()
    before = snapshot(run)
    resume = ["train", "--run-dir", str(run), "--resume"]
    line = usage_error([*resume, "--lr", "0.5", "--f-layers", "3"], capsys)
    assert "these differ: --f-layers (3, saved 1); --lr (0.5, saved 0.0003)" in line
    assert "only --epochs, --patience, --no-progress" in line
    line = usage_error([*resume, "--auto-calibrate"], capsys)
    assert "these differ: --auto-calibrate (True, saved None)" in line
    line = usage_error([*resume, "--epochs", "1"], capsys)
    assert "epochs = 1 (--epochs) is fewer than the 2 epochs" in line
    line = usage_error([*resume, "--dataset", "vonmises"], capsys)
    assert "--dataset ('vonmises', saved 'npy')" in line
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"train": {"beta": 7.0, "epochs": 4}}))
    line = usage_error([*resume, "--config", str(other)], capsys)
    assert f"train.beta (--config {other}) (7.0, saved" in line
    shutil.move(files, tmp_path / "moved")
    line = usage_error([*resume, "--epochs", "3"], capsys)
    assert "found neither at" in line and "--root PATH" in line
    assert snapshot(run) == before  # config.json, checkpoint and all byte-identical


def test_eval_and_resume_from_elsewhere_and_with_moved_data(files, tmp_path, capsys, monkeypatch):
    """The data path is stored as given and resolved: eval and resume work from another
    directory; after the data moved, --root (eval, resume) points the run at them."""
    monkeypatch.chdir(files)
    run = tmp_path / "run"
    argv = ["train", "--dataset", "npy", "--root", "train.npy", "--latent-dim", "1"]
    argv += ["--config", "tiny.json"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    trained = json.loads((run / "results.json").read_text())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "train.npy" is not here: the resolved path is used
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["nll"] == trained["nll"]
    shutil.move(files, tmp_path / "moved")
    capsys.readouterr()
    line = usage_error(["eval", str(run)], capsys)
    assert "data.root 'train.npy' is found neither at" in line and "--root PATH" in line
    moved = str(tmp_path / "moved" / "train.npy")
    assert main(["eval", str(run), "--root", moved]) == 0
    assert json.loads((run / "results.json").read_text())["nll"] == trained["nll"]
    assert json.loads((run / "config.json").read_text())["data"]["root"] == "train.npy"
    resume = ["train", "--run-dir", str(run), "--resume", "--epochs", "3"]
    assert main([*resume, "--root", "../moved/train.npy"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["data"]["root"] == "../moved/train.npy"
    assert saved["data_paths"]["root"] == moved


NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # import matplotlib now raises ImportError
from rnf_fast.cli import main
code = main(sys.argv[1:])
print("exit", code)
"""


def test_train_and_eval_without_matplotlib(files, tmp_path):
    """Without matplotlib, train and eval print and save everything else, say in one line
    that the plots were skipped and how to get them, and exit 0 (train used to exit 1 after
    training, with an ImportError, before printing the metrics)."""
    run = tmp_path / "run"
    for argv in (train_files(files, run), ["eval", str(run)]):
        done = subprocess.run(
            [sys.executable, "-c", NO_MATPLOTLIB, *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert done.returncode == 0, done.stderr
        assert "test NLL" in done.stdout and "recon MSE" in done.stdout and "exit 0" in done.stdout
        skipped = [line for line in done.stderr.splitlines() if "plots skipped" in line]
        assert len(skipped) == 1 and "pip install 'rnf_fast[plots]'" in skipped[0], done.stderr
        assert "Traceback" not in done.stderr
    assert (run / "results.json").exists() and not list(run.glob("*.png"))
