"""The ``rnf-fast`` command: train, evaluate and sample rectangular flows, benchmark the engine.

rnf-fast train [--dataset vonmises] [--config run.toml] [--epochs 20] ...
rnf-fast eval RUN_DIR
rnf-fast sample RUN_DIR -n 64 --out samples.npy
rnf-fast bench [--size quick] [--out DIR]
rnf-fast info
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

__all__ = ["main"]


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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
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


# Flags of `train`: (flag, config section, key, argparse options). Defaults come from the
# dataset preset and the config file, so every flag defaults to None ("not given").
_TRAIN_FLAGS: list[tuple[str, str, str, dict]] = [
    (
        "--d",
        "model",
        "d",
        {
            "type": int,
            "help": "latent (manifold) dimension d; default: the dataset's intrinsic dimension",
        },
    ),
    ("--f-layers", "model", "f_layers", {"type": int, "help": "coupling layers of f on R^D"}),
    (
        "--f-hidden",
        "model",
        "f_hidden",
        {"type": _int_list, "help": "hidden sizes of f's conditioners, e.g. 64,64"},
    ),
    (
        "--f-coupling",
        "model",
        "f_coupling",
        {"choices": ["affine", "spline"], "help": "coupling type of f"},
    ),
    ("--h-layers", "model", "h_layers", {"type": int, "help": "layers of h on R^d"}),
    ("--h-hidden", "model", "h_hidden", {"type": _int_list, "help": "hidden sizes of h"}),
    (
        "--objective",
        "train",
        "objective",
        {
            "choices": ["ml", "ts", "ml-no-logdet"],
            "help": "ml: maximum likelihood with the log det "
            "(default); ts: two-step; ml-no-logdet: baseline",
        },
    ),
    (
        "--method",
        "train",
        "method",
        {
            "choices": ["auto", "exact", "cg"],
            "help": "log-det gradient: exact, cg (Hutchinson + CG) or auto (measured cost rule)",
        },
    ),
    ("--probes", "train", "probes", {"type": int, "help": "Hutchinson probes K for cg"}),
    (
        "--probe-kind",
        "train",
        "probe_kind",
        {"choices": ["rademacher", "gaussian", "orthogonal"], "help": "distribution of the probes"},
    ),
    ("--beta", "train", "beta", {"type": float, "help": "reconstruction penalty β (50)"}),
    (
        "--warmup-start",
        "train",
        "warmup_start",
        {"type": int, "help": "epoch at which the likelihood weight starts to rise from 0"},
    ),
    ("--warmup-end", "train", "warmup_end", {"type": int, "help": "epoch at which it reaches 1"}),
    ("--lr", "train", "lr", {"type": float, "help": "Adam learning rate"}),
    (
        "--lr-schedule",
        "train",
        "lr_schedule",
        {"choices": ["constant", "cosine"], "help": "learning-rate schedule over the epochs"},
    ),
    ("--epochs", "train", "epochs", {"type": int, "help": "number of epochs"}),
    ("--batch-size", "train", "batch_size", {"type": int, "help": "batch size"}),
    (
        "--patience",
        "train",
        "patience",
        {"type": int, "help": "early-stopping patience (epochs without a better validation loss)"},
    ),
    ("--clip", "train", "clip", {"type": float, "help": "gradient-norm clipping"}),
    ("--seed", "train", "seed", {"type": int, "help": "seed of the run"}),
    ("--device", "train", "device", {"help": "cpu, cuda or cuda:N"}),
]


def _overrides(args: argparse.Namespace) -> dict:
    out: dict = {"data": {}, "model": {}, "train": {}}
    for flag, section, key, _ in _TRAIN_FLAGS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            out[section][key] = value
    if args.data_seed is not None:
        out["data"]["seed"] = args.data_seed
    if args.root is not None:
        out["data"]["root"] = args.root
    if args.standardize is not None:
        out["standardize"] = None if args.standardize == "none" else args.standardize
    if args.no_progress:
        out["train"]["progress"] = False
    return out


def _print_results(results: dict, run_dir: str) -> None:
    from .evaluation import format_metrics

    print(format_metrics(results))
    print(f"run folder: {run_dir} (config.json, model.pt, results.json, metrics.jsonl, plots)")


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
    from .runs import load_config_file, resolve_config, train_run

    if args.resume and not args.run_dir:
        raise SystemExit("--resume needs --run-dir: the run folder to continue")
    file_config = load_config_file(args.config) if args.config else None
    config = resolve_config(args.dataset, file_config=file_config, overrides=_overrides(args))
    run_dir = args.run_dir or _fresh_run_dir(config)
    results = train_run(config, run_dir, resume=args.resume)
    _print_results(results, run_dir)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .runs import evaluate_run

    _print_results(evaluate_run(args.run_dir), args.run_dir)
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from .runs import sample_run

    x = sample_run(args.run_dir, args.n, seed=args.seed)
    out = Path(args.out)
    if out.suffix == ".npy":
        import numpy as np

        np.save(out, x.numpy())
    elif out.suffix == ".pt":
        torch.save(x, out)
    elif out.suffix == ".csv":
        import numpy as np

        np.savetxt(out, x.numpy(), delimiter=",")
    else:
        raise SystemExit(f"--out must end in .npy, .pt or .csv, got {out.name}")
    print(f"wrote {args.n} samples to {out}")
    return 0


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    from .data import available_datasets

    names = available_datasets()
    p = sub.add_parser(
        "train",
        help="train and evaluate a rectangular flow",
        description="Train a rectangular flow on a dataset, then evaluate it (test NLL next to "
        "reconstruction error and sample Fréchet distance; the true entropy where known) and "
        "write plots. Options: dataset preset < --config file < flags.",
        epilog="datasets: " + "; ".join(f"{k}: {v}" for k, v in names.items()),
    )
    p.add_argument("--dataset", choices=sorted(names), help="dataset (default: vonmises)")
    p.add_argument("--root", help="folder of the dataset's files (file-based datasets)")
    p.add_argument("--data-seed", type=int, help="seed of the data sample and split")
    p.add_argument(
        "--standardize",
        choices=["none", "global", "feature"],
        help="standardise the data (global: one scale, keeps manifolds' shape)",
    )
    p.add_argument("--config", help="JSON or TOML file with sections data, model, train")
    p.add_argument(
        "--run-dir",
        help="run folder (default: a new runs/DATASET-OBJECTIVE-METHOD-seedN[-k])",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, _, _, options in _TRAIN_FLAGS:
        p.add_argument(flag, default=None, **options)
    p.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rnf-fast``."""
    parser = argparse.ArgumentParser(
        prog="rnf-fast",
        description="Rectangular normalizing flows with a fast log det(JᵀJ) engine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(sub)
    ev = sub.add_parser("eval", help="re-evaluate a trained run and redraw its plots")
    ev.add_argument("run_dir", help="run folder written by rnf-fast train")
    ev.set_defaults(func=_cmd_eval)
    sa = sub.add_parser("sample", help="draw samples (in data units) from a trained run")
    sa.add_argument("run_dir", help="run folder written by rnf-fast train")
    sa.add_argument("-n", type=int, default=64, help="number of samples (64)")
    sa.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    sa.add_argument("--out", default="samples.npy", help="output file: .npy, .pt or .csv")
    sa.set_defaults(func=_cmd_sample)
    info = sub.add_parser(
        "info", help="show versions, the backends and the kernels in use, with the reasons"
    )
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser(
        "bench",
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
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the problems run (cpu)"
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
    """Entry point of the ``rnf-fast`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
