"""What the log det adds to a maximum-likelihood training step of a rectangular flow.

One ML step (``ml_loss`` + backward, the trainer's objective at full likelihood weight) is timed
four ways on the same model and batch: without the log det (``ml-no-logdet``, the baseline
"plain"), with the exact log det, with CG (one Rademacher probe, the default tolerance) and with
CG under randomized truncation (``Roulette(4, 0.5)``, unbiased for the default tolerance's
iterate; see ``bench/study_cg_tol.py``). The
variants run interleaved, round after round in a shuffled order, so that they see the same load;
the report gives each variant's median and its ratio to plain. Before timing, each variant's
loss is checked finite and the two log-det variants' gradients are checked against each other
(cosine similarity above 0.9 with the exact gradient: one CG probe is noisy but unbiased).

Cases: the main job's von Mises circle (d = 1, B = 128), a MINIBOONE-shaped tabular flow (D =
43, d = 21, B = 400, the benchmark's 10 affine couplings of [128]*4), and the MNIST preset
(d = 20, B = 32). Models are at initialisation after ActNorm's data-dependent start, with
weights perturbed so that the couplings are not the identity.

    .venv/bin/python bench/step_cost.py [--rounds 15] [--cases vonmises,miniboone,mnist]
        [--out bench/results/step_cost.json]

Use one thread and a quiet machine (DESIGN.md §7).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.harness.measure import machine_info  # noqa: E402
from rnf_fast import Roulette  # noqa: E402
from rnf_fast.data import load_dataset  # noqa: E402
from rnf_fast.models import RectangularFlow  # noqa: E402
from rnf_fast.runs import MNIST_PRESET, _prepare, resolve_config  # noqa: E402
from rnf_fast.training import TrainConfig  # noqa: E402
from rnf_fast.training.objectives import ml_loss  # noqa: E402

VARIANTS = {
    "plain": {"with_logdet": False},
    "exact": {"with_logdet": True, "method": "exact"},
    "cg": {"with_logdet": True, "method": "cg", "probes": 1},
    "cg-roulette": {
        "with_logdet": True,
        "method": "cg",
        "probes": 1,
        "truncation": Roulette(min_iter=4, continue_prob=0.5),
    },
}


def _beta(config: dict) -> float:
    """β of a resolved configuration (the trainer's default where the preset sets none)."""
    return TrainConfig.from_dict(config["train"]).beta


def _vonmises() -> tuple[RectangularFlow, torch.Tensor, float]:
    config = resolve_config("vonmises")
    ds = load_dataset("vonmises", **config["data"])
    model = RectangularFlow({"D": ds.D, "d": 1, **config["model"]})
    return model, ds.train[:128], _beta(config)


def _miniboone() -> tuple[RectangularFlow, torch.Tensor, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 43, generator=g)
    model = RectangularFlow(
        {"D": 43, "d": 21, "f_layers": 10, "f_hidden": (128,) * 4, "f_coupling": "affine"}
    )
    return model, x, 50.0


def _mnist() -> tuple[RectangularFlow, torch.Tensor, float]:
    config = resolve_config("mnist5k")
    ds = load_dataset("mnist5k", **config["data"])
    x = _prepare(ds.train[:32], ds, None, seed=0)  # dequantised as the trainer does
    model = RectangularFlow({"D": ds.D, **MNIST_PRESET["model"]})
    return model, x, _beta(config)


CASES = {"vonmises": _vonmises, "miniboone": _miniboone, "mnist": _mnist}


def _perturbed(model: RectangularFlow, x: torch.Tensor) -> RectangularFlow:
    model.initialize(x)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.train()


def _step(model: RectangularFlow, x: torch.Tensor, beta: float, options: dict) -> dict:
    model.zero_grad(set_to_none=True)
    loss, parts = ml_loss(model, x, weight=1.0, beta=beta, **options)
    loss.backward()
    return parts


def _gradient(model: RectangularFlow) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def measure(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model, x, beta = CASES[name]()
    model = _perturbed(model, x)
    grads = {}
    for variant, options in VARIANTS.items():  # verify before timing
        loss = _step(model, x, beta, options)["loss"]
        if not bool(torch.isfinite(loss)):
            raise RuntimeError(f"{name} {variant}: the loss is not finite")
        grads[variant] = _gradient(model).clone()
    cosine = float(torch.nn.functional.cosine_similarity(grads["cg"], grads["exact"], dim=0))
    if cosine < 0.9:
        raise RuntimeError(f"{name}: cg's gradient has cosine {cosine:.3f} to the exact one")
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    matvecs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    rng = random.Random(0)
    # CG meets its tolerance within d iterations on every system only where A is well
    # conditioned: on the image flow it often does not (known, and the same in every round).
    warnings.filterwarnings("ignore", message="CG reached max_iter")
    for _ in range(rounds):
        rng.shuffle(order)
        for variant in order:
            start = time.perf_counter()
            parts = _step(model, x, beta, VARIANTS[variant])
            times[variant].append(time.perf_counter() - start)
            if "cg_matvecs" in parts:
                matvecs[variant].append(float(parts["cg_matvecs"]))
    plain = statistics.median(times["plain"])
    return {
        "B": x.shape[0],
        "D": model.D,
        "d": model.d,
        "cosine_cg_exact": cosine,
        "variants": {
            v: {
                "median_ms": 1e3 * statistics.median(t),
                "x_plain": statistics.median(t) / plain,
                **({"matvecs": statistics.mean(matvecs[v])} if matvecs[v] else {}),
            }
            for v, t in times.items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per case")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/step_cost.json")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or args.rounds < 1:
        parser.error(f"--cases must name some of {sorted(CASES)} and --rounds be >= 1")
    record = {"machine": machine_info(), "threads": torch.get_num_threads(), "cases": {}}
    for name in cases:
        record["cases"][name] = measure(name, args.rounds)
        row = record["cases"][name]
        variants = row["variants"].items()
        cells = "  ".join(f"{v} {r['median_ms']:.1f} ms ({r['x_plain']:.2f}x)" for v, r in variants)
        print(f"{name:10s} B={row['B']:4d}  {cells}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
