"""The ``rnf-fast`` command: ``info`` (backends, versions) and ``bench`` (the benchmark suite)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main"]


def _bench_dir() -> Path:
    bench = Path(__file__).resolve().parent.parent / "bench"
    if not (bench / "test_logdet_bench.py").exists():
        raise SystemExit(
            "rnf-fast bench runs the suite in the source checkout's bench/ folder, which this "
            "installation does not have; install from a clone with `pip install -e .`"
        )
    return bench


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, backend_report, benchmarks

    print(f"rnf_fast {__version__}")
    for key, value in benchmarks.machine_info().items():
        print(f"  {key}: {value}")
    print("backends:")
    for name, ok, detail in backend_report():
        print(f"  {name:8s} {'available' if ok else 'unavailable'}  ({detail})")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import pytest

    from .benchmarks import report_markdown

    bench = _bench_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "logdet.json"
    pytest_args = [str(bench), "-p", "no:cacheprovider", f"--bench-size={args.size}"]
    if args.size == "quick":
        pytest_args += ["--benchmark-disable", "-q"]
    else:
        pytest_args += [
            "--benchmark-enable",
            "--benchmark-save-data",
            f"--benchmark-json={json_path}",
            "--benchmark-columns=median,iqr,rounds",
        ]
    code = pytest.main(pytest_args)
    if code != 0:
        return int(code)
    if args.size != "quick":
        with open(json_path) as f:
            table = report_markdown(json.load(f))
        (out / "logdet.md").write_text(table)
        print(table)
        print(f"wrote {json_path} and {out / 'logdet.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rnf-fast``."""
    parser = argparse.ArgumentParser(
        prog="rnf-fast",
        description="Rectangular normalizing flows with a fast log det(JᵀJ) engine.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show versions and the available backends")
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser(
        "bench",
        help="benchmark the log det term against the autodiff references",
        description="Time and peak memory of one training step of the log det(JᵀJ) term "
        "for rnf_fast exact/cg and the pure-autodiff references; every case is verified "
        "against a float64 truth before it is timed. Writes JSON and a Markdown table.",
    )
    bench.add_argument(
        "--size",
        choices=["standard", "quick"],
        default="standard",
        help="standard: MLP decoder d=16 -> D=784, B=64 (about 2 minutes on 2 cores); "
        "quick: tiny sizes, run once without timing (checks the suite)",
    )
    bench.add_argument(
        "--out", default="bench/results", help="folder for logdet.json and logdet.md"
    )
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rnf-fast`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
