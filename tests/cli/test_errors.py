"""The command line's manners: one-line errors (exit status 2 for usage errors, 1 for failures,
the traceback only with --debug) found before anything is written, the warning about
unstandardised data far from scale 1, defaults in --help, --threads, and progress as one line
per epoch where stderr is not a terminal."""

from __future__ import annotations

import json
import re
import sys
import warnings

import numpy as np
import pytest
import torch

from rnf_fast.cli import build_parser, main
from rnf_fast.runs import prepare_run, resolve_config

from .errors import one_error_line, usage_error

TINY = {
    "data": {"n_train": 128, "n_val": 32, "n_test": 32},
    "model": {"f_layers": 1, "f_hidden": [8], "h_layers": 1},
    "train": {"epochs": 2, "batch_size": 64, "warmup_end": 0, "method": "exact"},
}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_bad_flags_are_one_line_usage_errors(capsys):
    line = usage_error(["train", "--method", "svd"], capsys)
    assert "argument --method: invalid choice: 'svd'" in line and "rnf-fast train --help" in line
    # 0 is a bad latent width, not "not given" (it used to fall back to the dataset's d).
    for flag in ("--d", "--latent-dim"):
        line = usage_error(["train", flag, "0"], capsys)
        assert "argument --latent-dim/--d: expected a positive integer, got '0'" in line
    # No abbreviations: --epoch is not taken for --epochs.
    assert "unrecognized arguments: --epoch" in usage_error(["train", "--epoch", "3"], capsys)
    assert "--resume needs --run-dir" in usage_error(["train", "--resume"], capsys)
    line = usage_error(["eval", "/nonexistent/run"], capsys)
    assert "/nonexistent/run is not a run folder" in line


def test_bad_inputs_are_usage_errors_and_write_nothing(tmp_path, tiny_config, capsys):
    """Values found wrong after parsing (config file, data files) are one line, exit status 2,
    and leave no run folder (it used to hold config.json alone)."""
    run = tmp_path / "run"
    bad_d = tmp_path / "d0.json"
    bad_d.write_text(json.dumps({**TINY, "model": {**TINY["model"], "d": 0}}))
    bad_lr = tmp_path / "lr.json"
    bad_lr.write_text(json.dumps({**TINY, "train": {**TINY["train"], "lr": -1.0}}))
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    array = tmp_path / "x.npy"
    np.save(array, np.random.default_rng(0).normal(size=(50, 3)))
    cases = [
        (["--config", str(bad_d)], "model.d (--latent-dim) must be an integer with 1 <= d < D = 2"),
        (["--config", str(bad_lr)], "lr must be a finite number > 0, got -1.0"),
        (["--dataset", "npy", "--root", str(empty)], f"{empty}: the file is empty"),
        (["--dataset", "csv", "--root", str(array)], f"{array}: not a text .csv file"),
        (["--config", str(tmp_path / "missing.toml")], "missing.toml does not exist"),
        (
            ["--method", "exact", "--auto-calibrate"],
            "auto_calibrate applies to method='auto' only, got method='exact'",
        ),
    ]
    for flags, message in cases:
        line = usage_error(["train", *flags, "--run-dir", str(run)], capsys)
        assert message in line, line
        assert not run.exists(), flags


def test_failures_exit_1_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    run = tmp_path / "broken"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(resolve_config("vonmises")))
    assert main(["eval", str(run)]) == 1  # a run folder without model.pt
    line = one_error_line(capsys.readouterr().err)
    assert "model.pt" in line and "--debug" in line
    with pytest.raises(FileNotFoundError, match="model.pt"):
        main(["eval", str(run), "--debug"])


def test_overwrite_refusal_names_the_flag_and_keeps_the_run(tmp_path, tiny_config, capsys):
    """A second train into a run folder says --resume (not the Python resume=True) and changes
    nothing there; the first one, on a non-terminal stderr, showed one line per epoch."""
    run = tmp_path / "run"
    argv = ["train", "--config", tiny_config, "--run-dir", str(run)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.findall(r"^epoch (\d)/2: train loss .*, val loss .* s$", err, re.M) == ["1", "2"]
    assert len(err) < 400, err  # no tqdm lines
    saved = {p.name: p.read_bytes() for p in run.iterdir()}
    line = usage_error([*argv, "--epochs", "5"], capsys)
    assert "add --resume to continue it" in line and "resume=True" not in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == saved


def test_no_progress_prints_one_line_per_epoch(tmp_path, tiny_config, capsys):
    argv = ["train", "--config", tiny_config, "--run-dir", str(tmp_path / "r"), "--no-progress"]
    assert main([*argv, "--epochs", "3"]) == 0
    captured = capsys.readouterr()
    assert [line[:9] for line in captured.err.splitlines()] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ]
    assert "test NLL" in captured.out


def test_progress_bars_on_a_terminal(tmp_path, capsys, monkeypatch):
    """On a terminal, tqdm bars and no epoch lines."""
    from rnf_fast.models import RectangularFlow
    from rnf_fast.training import train

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    model = RectangularFlow({"D": 3, "d": 2, "f_layers": 1, "h_layers": 1})
    x = torch.randn(64, 3)
    train(model, x[:48], x[48:], {"epochs": 2, "batch_size": 16}, tmp_path)
    err = capsys.readouterr().err
    assert "\r" in err and "train:" in err
    assert not re.search(r"^epoch \d/2:", err, re.M)


def test_scale_warning_for_unstandardised_data(tmp_path, capsys):
    """Integer data at ±200 (they trained silently to a reconstruction MSE of 428): a one-line
    warning with the measured scale and the flag; none once standardised."""
    rng = np.random.default_rng(0)
    angle = rng.uniform(0, 2 * np.pi, 200)
    data = np.round(200 * np.stack([np.cos(angle), np.sin(angle)], 1))
    path = tmp_path / "ints.npy"
    np.save(path, data)
    config = resolve_config("npy", overrides={"data": {"root": str(path)}, "model": {"d": 1}})
    with pytest.warns(UserWarning, match=r"root-mean-square value is 14\d.*--standardize global"):
        prepare_run(config, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    config["standardize"] = "global"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_run(config, tmp_path / "b")
    # On the command line: one line, "rnf-fast: warning: ...", then the run goes on.
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({**TINY, "data": {}, "train": {**TINY["train"], "epochs": 1}}))
    argv = ["train", "--dataset", "npy", "--root", str(path), "--latent-dim", "1"]
    assert main([*argv, "--config", str(tiny), "--run-dir", str(tmp_path / "c")]) == 0
    warning_lines = [
        line for line in capsys.readouterr().err.splitlines() if "warning" in line.lower()
    ]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("rnf-fast: warning: the")


def _option_entries(help_text: str) -> dict[str, str]:
    """{first option string: its help, on one line} from an argparse help text."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_help_shows_every_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        entries = _option_entries(sub.format_help())
        assert len(entries) >= 2, name
        for flag, text in entries.items():
            if flag != "-h":
                assert "default" in text, (name, text)
    train = _option_entries(commands["train"].format_help())
    # The von Mises preset's β (100) next to the base's 50; the alias of --latent-dim.
    assert "(default: 50; vonmises preset: 100)" in train["--beta"]
    assert train["--latent-dim"].startswith("--latent-dim d, --d d")
    assert "default: the dataset's intrinsic dimension" in train["--latent-dim"]
    assert "(default: 64)" in _option_entries(commands["sample"].format_help())["-n"]


def test_threads_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            main(["train", "--threads", str(before + 1), "--resume"])  # a usage error after it
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    assert "expected a positive integer" in usage_error(["train", "--threads", "0"], capsys)
