"""The ``rnf-fast`` command: train, evaluate and sample rectangular flows, benchmark the engine.

rnf-fast train [--dataset vonmises] [--config run.toml] [--epochs 20] ...
rnf-fast train --train a.npy [--val v.npy] [--test b.npy] --latent-dim 2 ...
rnf-fast train --run-dir RUN_DIR --resume [--epochs 60]
rnf-fast eval RUN_DIR [--data b.npy]
rnf-fast sample RUN_DIR -n 64 --out samples.npy
rnf-fast bench [--size quick] [--out DIR]
rnf-fast info

Under ``torchrun`` (``torchrun --nproc-per-node 2 -m rnf_fast.cli train ...``) ``train`` joins
the process group: the ranks share each batch and rank 0 alone writes and prints.

Errors are one line on stderr, ``rnf-fast: error: ...``: exit status 2 for usage errors (bad
flags or values, found before anything is written), 1 for failures; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["UsageError", "build_parser", "main"]

PROG = "rnf-fast"


class UsageError(Exception):
    """A bad flag or value found after parsing: reported like argparse's own (exit status 2)."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _prefix() -> str:
    """``rnf-fast``, with the rank on the ranks other than 0 of a ``torchrun`` launch."""
    rank = os.environ.get("RANK", "0")
    return PROG if rank == "0" else f"{PROG} [rank {rank}]"


def _report(kind: str, message: str) -> None:
    print(f"{_prefix()}: {kind}: {_one_line(message)}", file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, ``rnf-fast: warning: ...`` (the category unless a UserWarning)."""
    name = "" if category is UserWarning else f"{category.__name__}: "
    _report("warning", f"{name}{message}")


def _describe(err: BaseException) -> str:
    """An exception as one line: its message, after its type unless that says nothing more."""
    if isinstance(err, (ValueError, TypeError, OSError)) and str(err):
        return str(err)
    return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def _inputs(flag: str | None = None) -> Iterator[None]:
    """Errors raised while the inputs are checked (before anything is written) are usage
    errors: bad values in flags, config files and data files (prefixed by ``flag`` when the
    values checked are those of one flag)."""
    try:
        yield
    except (ValueError, TypeError, OSError) as err:
        prefix = f"{flag}: " if flag else ""
        raise UsageError(prefix + _describe(err)) from err


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``rnf-fast: error: ...`` (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        _report("error", f"{message} (see `{self.prog} --help`)")
        raise SystemExit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to every option whose help does not state its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _data_file(text: str) -> str:
    """A .npy or .csv file that exists (--train, --val, --test, --data)."""
    from .data import TABLE_SUFFIXES

    if Path(text).suffix not in TABLE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"expected a .npy or .csv file, got {text!r}")
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return text


def _run_folder(text: str) -> str:
    if not (Path(text) / "config.json").is_file():
        raise argparse.ArgumentTypeError(
            f"{text} is not a run folder of rnf-fast train (no config.json in it)"
        )
    return text


def _cmd_info(args: argparse.Namespace) -> int:
    from .machine import machine_info
    from .ops import cpp as cpp_backend
    from .ops.dispatch import backend_report
    from .ops.triton import triton_unavailable_reason

    info = machine_info()
    print(f"rnf_fast {info.pop('rnf_fast')}")
    for key, value in info.items():
        print(f"  {key}: {value}")
    print("backends:")
    for name, ok, detail in backend_report():
        print(f"  {name:8s} {'available' if ok else 'unavailable'}  ({detail})")
    print("kernels:")
    reason = triton_unavailable_reason()
    if reason is not None:
        matvec = f"PyTorch reference ({reason})"
    else:
        matvec = "Triton on float32 CUDA tensors under the triton backend"
        if not torch.cuda.is_available():
            matvec += " (no CUDA device here)"
    print(f"  {'matvec':8s} {matvec}")
    reason = cpp_backend.cuda_unavailable_reason()
    cuda = "compiled CUDA kernels" if reason is None else f"PyTorch reference ({reason})"
    print(f"  {'_C cuda':8s} {cuda}")
    return 0


def _bench_dir() -> Path:
    """The bench/ folder of the checkout this package runs from (an editable install)."""
    return Path(__file__).resolve().parent.parent / "bench"


def _import_harness():
    """The benchmark harness, ``bench/harness`` of the checkout beside this package; a
    one-line error that says where the suite lives when the package runs without it."""
    bench = _bench_dir()
    if not (bench / "harness" / "__init__.py").is_file():
        raise SystemExit(
            "rnf-fast bench: the benchmark suite is not part of the installed package; it lives "
            "in bench/ of the rnf_fast repository: run this command from a checkout installed "
            f"with `pip install -e .` (no bench/harness beside {Path(__file__).parent})"
        )
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    import harness

    return harness


def _cmd_bench(args: argparse.Namespace) -> int:
    harness = _import_harness()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = harness.run_suite(
        args.size, device=args.device, budget_s=args.budget, progress=not args.no_progress
    )
    json_path = out / f"suite_{args.size}.json"
    md_path = out / f"suite_{args.size}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    table = harness.markdown(results)
    md_path.write_text(table)
    plots = harness.plots(results, args.plots or out, prefix=f"bench_{args.size}")
    print(table)
    print(f"wrote {json_path}, {md_path} and {', '.join(str(p) for p in plots)}")
    return 0


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# Flags of `train`: (flags, config section, key, argparse options). Defaults come from the
# dataset preset and the config file, so every flag defaults to None ("not given"); the help
# states the real default (see _default_text). The latent width is --latent-dim: torchrun's
# parser rejects --d as an ambiguous abbreviation of its own options (--duplicate-*), so --d is
# only an alias for runs without a launcher.
_TRAIN_FLAGS: list[tuple[tuple[str, ...], str, str, dict]] = [
    (
        ("--latent-dim", "--d"),
        "model",
        "d",
        {"type": _positive_int, "metavar": "d", "help": "latent (manifold) dimension d"},
    ),
    (("--f-layers",), "model", "f_layers", {"type": int, "help": "coupling layers of f on R^D"}),
    (
        ("--f-hidden",),
        "model",
        "f_hidden",
        {"type": _int_list, "help": "hidden sizes of f's conditioners, e.g. 64,64"},
    ),
    (
        ("--f-coupling",),
        "model",
        "f_coupling",
        {"choices": ["affine", "spline"], "help": "coupling type of f"},
    ),
    (("--h-layers",), "model", "h_layers", {"type": int, "help": "layers of h on R^d"}),
    (("--h-hidden",), "model", "h_hidden", {"type": _int_list, "help": "hidden sizes of h"}),
    (
        ("--objective",),
        "train",
        "objective",
        {
            "choices": ["ml", "ts", "ml-no-logdet"],
            "help": "ml: maximum likelihood with the log det; ts: two-step; ml-no-logdet: baseline",
        },
    ),
    (
        ("--method",),
        "train",
        "method",
        {
            "choices": ["auto", "exact", "cg"],
            "help": "log-det gradient: exact, cg (Hutchinson + CG) or auto (measured cost rule)",
        },
    ),
    (
        ("--auto-calibrate",),
        "train",
        "auto_calibrate",
        {
            "action": "store_true",
            "help": "with --method auto: choose exact or cg by timing both on the first steps "
            "on this device, instead of the cost rule fitted on a CPU; the decisions are saved "
            "in the checkpoint, so --resume makes the same choices (the environment variable "
            "RNF_FAST_AUTO_CALIBRATE=1 switches it on too)",
        },
    ),
    (
        ("--probes",),
        "train",
        "probes",
        {"type": _positive_int, "help": "Hutchinson probes K for cg"},
    ),
    (
        ("--probe-kind",),
        "train",
        "probe_kind",
        {"choices": ["rademacher", "gaussian", "orthogonal"], "help": "distribution of the probes"},
    ),
    (("--beta",), "train", "beta", {"type": float, "help": "reconstruction penalty β"}),
    (
        ("--warmup-start",),
        "train",
        "warmup_start",
        {
            "type": _nonnegative_int,
            "help": "epoch at which the likelihood weight starts to rise from 0",
        },
    ),
    (
        ("--warmup-end",),
        "train",
        "warmup_end",
        {"type": _nonnegative_int, "help": "epoch at which it reaches 1"},
    ),
    (("--lr",), "train", "lr", {"type": float, "help": "Adam learning rate"}),
    (
        ("--lr-schedule",),
        "train",
        "lr_schedule",
        {"choices": ["constant", "cosine"], "help": "learning-rate schedule over the epochs"},
    ),
    (("--epochs",), "train", "epochs", {"type": _positive_int, "help": "number of epochs"}),
    (
        ("--batch-size",),
        "train",
        "batch_size",
        {"type": _positive_int, "help": "global batch size (shared by the ranks under torchrun)"},
    ),
    (
        ("--patience",),
        "train",
        "patience",
        {
            "type": _positive_int,
            "help": "early-stopping patience (epochs without a better validation loss)",
        },
    ),
    (("--clip",), "train", "clip", {"type": float, "help": "gradient-norm clipping"}),
    (("--seed",), "train", "seed", {"type": _nonnegative_int, "help": "seed of the run"}),
    (("--device",), "train", "device", {"help": "cpu, cuda or cuda:N"}),
]

_UNSET = {"d": "the dataset's intrinsic dimension", "clip": "no clipping"}
"""What an option left unset means, where that is not simply "none"."""


def _shown(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default_text(section: str | None, key: str) -> str:
    """``default: X`` for an option of ``train``, with the presets that set another value."""
    from .runs import option_defaults

    base, presets = option_defaults(section, key)
    text = f"default: {_UNSET.get(key, 'none') if base is None else _shown(base)}"
    if presets:
        text += "; " + ", ".join(f"{name} preset: {_shown(v)}" for name, v in presets.items())
    return text


def _dataset(args: argparse.Namespace) -> str | None:
    """--dataset, or npy / csv for --train by the file's extension (None: neither given)."""
    if args.train is None:
        return args.dataset
    if args.root is not None:
        raise UsageError(
            "--train FILE stands for --dataset npy|csv --root FILE: give one or the other"
        )
    kind = Path(args.train).suffix[1:]
    if args.dataset not in (None, kind):
        raise UsageError(f"--train {args.train} is a {kind} file, but --dataset is {args.dataset}")
    return kind


def _overrides(args: argparse.Namespace) -> dict:
    """The options given as flags (those left out are absent), as config sections."""
    out: dict = {"data": {}, "model": {}, "train": {}}
    for _, section, key, _ in _TRAIN_FLAGS:
        value = getattr(args, key)
        if value is not None:
            out[section][key] = value
    data = {"seed": args.data_seed, "root": args.train or args.root}
    data.update(val_file=args.val, test_file=args.test)
    out["data"].update({k: v for k, v in data.items() if v is not None})
    if args.standardize is not None:
        out["standardize"] = None if args.standardize == "none" else args.standardize
    if args.no_progress:
        out["train"]["progress"] = "epochs"
    return out


def _flat_keys(config: dict) -> list[str]:
    """``section.key`` for the options in config's sections, ``key`` for its top-level ones."""
    keys = []
    for key, value in config.items():
        keys += [f"{key}.{k}" for k in value] if isinstance(value, dict) else [key]
    return keys


def _resume_changes(
    args: argparse.Namespace, file_config: dict | None
) -> tuple[dict, dict[str, str]]:
    """The changes a resumed run is asked for (a --config file, then flags) and the names of
    the options as the user gave them, for errors (``{"train.lr": "--lr"}``)."""
    overrides = _overrides(args)
    dataset = _dataset(args)
    if dataset is not None:
        overrides["dataset"] = dataset
    changes: dict = {}
    for layer in (file_config or {}, overrides):
        for key, value in layer.items():
            changes[key] = {**changes.get(key, {}), **value} if isinstance(value, dict) else value
    names = {key: f"{key} (--config {args.config})" for key in _flat_keys(file_config or {})}
    spelled = {f"{section}.{key}": flags[0] for flags, section, key, _ in _TRAIN_FLAGS}
    spelled.update(
        {
            "dataset": "--train" if args.train else "--dataset",
            "data.seed": "--data-seed",
            "data.root": "--train" if args.train else "--root",
            "data.val_file": "--val",
            "data.test_file": "--test",
            "standardize": "--standardize",
            "train.progress": "--no-progress",
        }
    )
    # An option both in the file and given as a flag is the flag's.
    given = set(_flat_keys(overrides))
    names.update({key: flag for key, flag in spelled.items() if key in given or key not in names})
    return changes, names


def _check_held_out(args: argparse.Namespace, config: dict) -> None:
    """--val and --test need the training data from a file (npy or csv)."""
    for flag, value in (("--val", args.val), ("--test", args.test)):
        if value is not None and config["dataset"] not in ("npy", "csv"):
            raise UsageError(
                f"{flag} needs the training data from a file, --train FILE (or --dataset "
                f"npy|csv --root FILE); dataset {config['dataset']!r} makes its own splits"
            )


def _print_results(results: dict, run_dir: str) -> None:
    from .evaluation import format_metrics

    print(format_metrics(results))
    plots = sorted(p.name for p in Path(run_dir).glob("*.png"))
    files = ", ".join(["config.json", "model.pt", "results.json", "metrics.jsonl", *plots])
    print(f"run folder: {run_dir} ({files}{'' if plots else '; no plots'})")


def _fresh_run_dir(config: dict) -> str:
    """runs/DATASET-OBJECTIVE-METHOD-seedN, with -2, -3, ... appended if that exists."""
    t = config["train"]
    base = os.path.join(
        "runs",
        f"{config['dataset']}-{t.get('objective', 'ml')}-{t.get('method', 'auto')}"
        f"-seed{t.get('seed', 0)}",
    )
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path


def _cmd_train(args: argparse.Namespace) -> int:
    from .runs import load_config_file, prepare_run, resolve_config, resume_config
    from .training import distributed

    with _inputs():
        if args.resume and not args.run_dir:
            raise UsageError("--resume needs --run-dir: the run folder to continue")
        file_config = load_config_file(args.config) if args.config else None
        if args.resume:
            # The saved configuration is the default; flags may extend it (more epochs, ...).
            changes, names = _resume_changes(args, file_config)
            config = resume_config(args.run_dir, changes, names=names)
        else:
            overrides = _overrides(args)
            config = resolve_config(_dataset(args), file_config=file_config, overrides=overrides)
            _check_held_out(args, config)
    joined = distributed.launched()
    if joined:
        device = str(config["train"].get("device", "cpu"))
        distributed.init_from_env(backend=distributed.backend_for(device))
    try:
        # Under torchrun, rank 0 names a fresh folder for all: the ranks must not race for it.
        run_dir = args.run_dir or distributed.broadcast_object(_fresh_run_dir(config))
        with _inputs():
            if not args.resume and (Path(run_dir) / "checkpoint.pt").exists():
                raise UsageError(
                    f"--run-dir {run_dir} already holds a trained run (checkpoint.pt): add "
                    "--resume to continue it, or choose another --run-dir"
                )
            prepared = prepare_run(config, run_dir, resume=args.resume)
        results = prepared.train()
    finally:
        if joined:
            distributed.shutdown()
    if results is not None:
        _print_results(results, run_dir)
    return 0


def _moved_data(args: argparse.Namespace) -> dict[str, str]:
    """The new places of a run's data files given to eval (--root/--train, --val, --test)."""
    given = {"root": args.root, "val_file": args.val, "test_file": args.test}
    return {key: value for key, value in given.items() if value is not None}


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import format_metrics
    from .runs import load_run

    paths = _moved_data(args)
    if args.data is not None and paths:
        raise UsageError(
            "--data evaluates on that file alone, --root/--train, --val and --test point the "
            "run at its own data: give one or the other"
        )
    run = load_run(args.run_dir)
    if args.data is not None:
        with _inputs("--data"):
            rows = run.read(args.data)
        results, written = run.evaluate_file(args.data, rows=rows)
        print(f"{args.data}: {rows.shape[0]} rows of D = {rows.shape[1]}")
        print(format_metrics(results))
        print(f"wrote {written}")
        return 0
    with _inputs():
        run = run.pointed_at(paths) if paths else run
        ds = run.dataset()
    _print_results(run.evaluate(ds), args.run_dir)
    return 0


_SAMPLE_SUFFIXES = (".npy", ".pt", ".csv")


def _cmd_sample(args: argparse.Namespace) -> int:
    from .runs import sample_run

    out = Path(args.out)
    if out.suffix not in _SAMPLE_SUFFIXES:
        raise UsageError(f"--out must end in .npy, .pt or .csv, got {out.name}")
    x = sample_run(args.run_dir, args.n, seed=args.seed)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, x.numpy())
    elif out.suffix == ".pt":
        torch.save(x, out)
    else:
        import numpy as np

        np.savetxt(out, x.numpy(), delimiter=",")
    print(f"wrote {args.n} samples to {out}")
    return 0


def _common_parent() -> argparse.ArgumentParser:
    """--debug, which every command takes."""
    parent = _Parser(add_help=False, allow_abbrev=False)
    parent.add_argument(
        "--debug", action="store_true", help="on an error, show the traceback, not one line"
    )
    return parent


def _threads_parent() -> argparse.ArgumentParser:
    """--threads, for the commands that compute."""
    parent = _Parser(add_help=False, allow_abbrev=False)
    parent.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads of torch (default: torch's choice, "
        f"{torch.get_num_threads()} here); with other jobs on the machine, 1 per job avoids "
        "oversubscription",
    )
    return parent


def _add_parser(sub: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, allow_abbrev=False, **kwargs)


def _add_train_parser(sub: argparse._SubParsersAction, parents: list) -> None:
    from .data import available_datasets
    from .runs import DEFAULT_DATASET

    names = available_datasets()
    p = _add_parser(
        sub,
        "train",
        parents=parents,
        help="train and evaluate a rectangular flow",
        description="Train a rectangular flow on a dataset or on your own files (--train, "
        "--val, --test), then evaluate it (test NLL next to reconstruction error and sample "
        "Fréchet distance; the true entropy where known) and write plots (with matplotlib). "
        "Options: dataset preset < --config file < flags; a resumed run (--run-dir X "
        "--resume) starts from its saved configuration. Under torchrun "
        "(torchrun --nproc-per-node 2 -m rnf_fast.cli train ...) the processes share each "
        "batch (DDP: gloo on CPU, nccl on CUDA) and rank 0 alone writes.",
        epilog="datasets: " + "; ".join(f"{k}: {v}" for k, v in names.items()),
    )
    p.add_argument("--dataset", choices=sorted(names), help=f"dataset (default: {DEFAULT_DATASET})")
    p.add_argument(
        "--train",
        type=_data_file,
        metavar="FILE",
        help="training data: the rows (N, D) of a .npy or .csv file (by extension; csv: "
        "comma-separated, a header line is detected); stands for --dataset npy|csv --root FILE. "
        "Without --val and --test, validation and test rows are cut from it: its rows are "
        "shuffled by numpy's default_rng(--data-seed), the first round(N/10) are validation, "
        "the next round(N/10) test, the rest train (80/10/10); --val or --test FILE takes the "
        "place of that cut (--test alone: 90%% train, 10%% validation). --standardize is "
        "fitted on the training rows alone. On --resume: where the run's training file is now "
        "(default: none)",
    )
    p.add_argument(
        "--val",
        type=_data_file,
        metavar="FILE",
        help="validation rows (early stopping, validation loss): a .npy or .csv file as wide as "
        "--train; on --resume: where it is now (default: cut from --train)",
    )
    p.add_argument(
        "--test",
        type=_data_file,
        metavar="FILE",
        help="test rows (the evaluation after training): a .npy or .csv file as wide as "
        "--train; on --resume: where it is now (default: cut from --train)",
    )
    p.add_argument(
        "--root",
        help="where the data of a file-based dataset are: the file for npy, csv and image-npy, "
        "the folder for the others; on --resume: where the run's data are now, if they moved "
        "(default: none)",
    )
    p.add_argument(
        "--data-seed",
        type=_nonnegative_int,
        help="seed of the data sample and of the split of --train / --root files (default: 0)",
    )
    p.add_argument(
        "--standardize",
        choices=["none", "global", "feature"],
        help="standardise the data, fitted on the training split (global: one scale, keeps "
        f"manifolds' shape; {_default_text(None, 'standardize')})",
    )
    p.add_argument(
        "--config", help="JSON or TOML file with sections data, model, train (default: none)"
    )
    p.add_argument(
        "--run-dir",
        help="run folder (default: a new runs/DATASET-OBJECTIVE-METHOD-seedN[-k])",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --run-dir from its checkpoint, with its saved configuration; "
        "only --epochs (more), --patience, --no-progress and the data's places (--train/--root, "
        "--val, --test) may be given",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars: one line per epoch on stderr (what a log file gets anyway)",
    )
    for flags, section, key, options in _TRAIN_FLAGS:
        help_text = f"{options['help']} ({_default_text(section, key)})"
        p.add_argument(*flags, dest=key, default=None, **{**options, "help": help_text})
    p.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rnf-fast`` (no abbreviated options: ``--lr`` is never taken
    for ``--lr-schedule``, and a launcher's parser sees what ours does)."""
    parser = _Parser(
        prog=PROG,
        description="Rectangular normalizing flows with a fast log det(JᵀJ) engine.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common, threads = _common_parent(), _threads_parent()
    _add_train_parser(sub, [common, threads])
    ev = _add_parser(
        sub,
        "eval",
        parents=[common, threads],
        help="re-evaluate a trained run and redraw its plots, or evaluate it on another file",
        description="Evaluate a trained run, from any directory: on its test split (rewrites "
        "results.json and the plots), or with --data on every row of another file (writes "
        "eval-NAME.json in the run folder). Prints the NLL with its standard error next to "
        "the reconstruction error and the Fréchet distance of samples (and the true entropy "
        "where the run's data set knows it).",
    )
    ev.add_argument("run_dir", type=_run_folder, help="run folder written by rnf-fast train")
    ev.add_argument(
        "--data",
        type=_data_file,
        metavar="FILE",
        help="evaluate on all rows of this .npy or .csv file (N, D), in the units of the "
        "training data and as wide as they are; writes RUN_DIR/eval-FILENAME.json (default: "
        "the run's test split)",
    )
    ev.add_argument(
        "--root",
        "--train",
        dest="root",
        metavar="PATH",
        help="where the run's data (--root, or the file of --train) are now, if they moved "
        "(default: where the run was trained)",
    )
    ev.add_argument(
        "--val",
        type=_data_file,
        metavar="FILE",
        help="where the run's --val file is now (default: where the run was trained)",
    )
    ev.add_argument(
        "--test",
        type=_data_file,
        metavar="FILE",
        help="where the run's --test file is now (default: where the run was trained)",
    )
    ev.set_defaults(func=_cmd_eval)
    sa = _add_parser(
        sub,
        "sample",
        parents=[common, threads],
        help="draw samples (in data units) from a trained run",
    )
    sa.add_argument("run_dir", type=_run_folder, help="run folder written by rnf-fast train")
    sa.add_argument("-n", type=_positive_int, default=64, help="number of samples")
    sa.add_argument("--seed", type=_nonnegative_int, default=0, help="sampling seed")
    sa.add_argument("--out", default="samples.npy", help="output file: .npy, .pt or .csv")
    sa.set_defaults(func=_cmd_sample)
    info = _add_parser(
        sub,
        "info",
        parents=[common],
        help="show versions, the backends and the kernels in use, with the reasons",
    )
    info.set_defaults(func=_cmd_info)
    bench = _add_parser(
        sub,
        "bench",
        parents=[common],
        help="benchmark the log det term against the alternatives (speed, memory, accuracy)",
        description="Time per training step, peak memory, matvecs and accuracy of the log "
        "det(JᵀJ) term for rnf_fast (exact, CG, auto, each backend) against the autodiff "
        "Jacobians, the official code's algorithm and the free-form surrogate, on MLP "
        "decoders and rectangular flows, plus the exact-vs-CG study over d. Every cell is "
        "verified against a float64 truth before it is timed. Writes suite_SIZE.json, "
        "suite_SIZE.md and plots (see bench/README.md). Runs the harness in bench/ of the "
        "checkout this package is installed from (pip install -e .).",
    )
    bench.add_argument(
        "--size",
        choices=["standard", "quick"],
        default="standard",
        help="standard: the README problems (about 20 minutes on 2 CPU cores); quick: tiny "
        "sizes, every cell verified and run once (checks the suite)",
    )
    bench.add_argument(
        "--out", default="bench/results", help="folder for suite_SIZE.json and suite_SIZE.md"
    )
    bench.add_argument(
        "--plots", default=None, help="folder for the bench_SIZE_*.png plots (default: --out)"
    )
    bench.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the problems run"
    )
    bench.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of measurement shared by the cells (default: 900 standard, 0 quick); "
        "cells estimated to exceed their share are skipped with the estimate",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rnf-fast`` command.

    Returns:
        0, or 1 after a failure reported as one line on stderr (``--debug``: the traceback).

    Raises:
        SystemExit: 2 after a usage error (reported as one line), 0 after ``--help``.
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return args.func(args)
        except UsageError as err:
            if args.debug:
                raise
            _report("error", f"{err} (see `{PROG} {args.command} --help`)")
            raise SystemExit(2) from None
        except Exception as err:
            if args.debug:
                raise
            _report("error", f"{_describe(err)} (--debug shows the traceback)")
            return 1


if __name__ == "__main__":
    sys.exit(main())
