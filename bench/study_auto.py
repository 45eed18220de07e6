"""The cost model behind ``method="auto"``: exact against CG in matvec, tangent and d terms.

MLP decoder d -> 256 -> 256 -> 784 (tanh), B = 64, float32 model, float64 CG, one training step
of the log det term. ``explicit`` is the nn.Sequential fast path, ``generic`` the torch.func
path (forced with ``batching="vmap"``).

Model (milliseconds at B = 64; m = batched matvecs CG performs, i.e. the slowest system):

    exact(d)     = e0 + e1·d + e2·d²                       primal + d tangents and their backward,
                                                            then JᵀJ and A⁻¹Jᵀ (d² D per sample)
    cg(d, K, m)  = c0 + c1·K + m·(c2 + c3·K) + c4·K·m³     K differentiable tangents, m matvecs
                   + c5·K·m·d                               (fixed + per-probe part), Lanczos eigh,
                                                            the d-wide ends of each product
                                                            (fixed + per-probe part), Lanczos eigh

fitted by non-negative least squares on relative error to the timings below, with m from
:data:`EXPECTED_MATVECS`. The timings were measured on a quiet 2-core CPU (median of 5 rounds,
all contenders interleaved; ``--time`` re-measures them, which is only meaningful on a quiet
machine). The matvec counts do not depend on the load and are re-measured on every run.

    python bench/study_auto.py          # fit, writes bench/results/auto.md
    python bench/study_auto.py --time   # re-measure the timings first (quiet machine only)
"""

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from harness import make_problem
from scipy.optimize import nnls

from rnf_fast import logdet_grad
from rnf_fast.engine.auto import (
    AUTO_COST_MODEL,
    AUTO_EXPECTED_MATVECS,
    AUTO_MEASURED_MS,
    _interp_log2,
    choose_method,
)

DS = [4, 8, 16, 32, 64, 128, 256]
ROUNDS = 5
RESULTS = Path(__file__).resolve().parent / "results"

# (d, exact ms, cg K=1 ms, cg K=4 ms) on a quiet 2-core CPU (bench/results/auto.md): the
# measurements the shipped cost model was fitted to.
TIMINGS = AUTO_MEASURED_MS


def _step(problem, **kw):
    def run():
        for p in problem.decoder.parameters():
            p.grad = None
        logdet_grad(problem.decoder, problem.z, **kw).sum().backward()

    return run


def measure_timings() -> dict[str, list[tuple[int, float, float, float]]]:
    out = {}
    for path, batching in (("explicit", "auto"), ("generic", "vmap")):
        out[path] = []
        for d in DS:
            problem = make_problem("mlp-16-784", d=d, truth=False)
            runs = {
                "exact": _step(problem, method="exact", batching=batching),
                "cg1": _step(problem, method="cg", probes=1, batching=batching),
                "cg4": _step(problem, method="cg", probes=4, batching=batching),
            }
            rounds = ROUNDS if d <= 64 else 3
            times = {k: [] for k in runs}
            for _ in range(rounds + 2):  # the first two rounds warm up and are dropped
                for k, fn in runs.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
            med = [sorted(v[2:])[rounds // 2] * 1e3 for v in times.values()]
            out[path].append((d, *med))
    return out


def measure_matvecs() -> dict[tuple[int, int], float]:
    """Batched matvecs of CG (default tol and max_iter) per (d, K), mean over 3 probe draws."""
    out = {}
    for d in DS:
        problem = make_problem("mlp-16-784", d=d, truth=False)
        for K in (1, 4):
            counts = []
            for seed in range(3):
                _, info = logdet_grad(
                    problem.decoder,
                    problem.z.detach(),
                    method="cg",
                    probes=K,
                    generator=torch.Generator().manual_seed(seed),
                    return_info=True,
                )
                counts.append(info.cg.matvecs)
            out[d, K] = sum(counts) / len(counts)
    return out


def _features_exact(d: float) -> list[float]:
    return [1.0, d, d * d]


def _features_cg(K: float, m: float, d: float) -> list[float]:
    return [1.0, K, m, K * m, K * m**3, K * m * d]


def fit(timings, matvecs) -> dict[str, dict[str, tuple[float, ...]]]:
    """Non-negative least squares on relative error, per path."""

    def nnls_rel(X, y):
        X, y = np.asarray(X), np.asarray(y)
        coef, _ = nnls(X / y[:, None], np.ones_like(y))
        return tuple(float(c) for c in coef)

    model = {}
    for path, rows in timings.items():
        exact = nnls_rel([_features_exact(d) for d, *_ in rows], [r[1] for r in rows])
        X, y = [], []
        for d, _, t1, t4 in rows:
            for K, t in ((1, t1), (4, t4)):
                X.append(_features_cg(K, matvecs[d, K], d))
                y.append(t)
        model[path] = {"exact": exact, "cg": nnls_rel(X, y)}
    return model


def _flow_rows(model: dict) -> list[str]:
    """The model's choice on the rectangular flows of ``bench/step_cost.py`` (whole ML steps,
    its last run's ``step_cost.json``) against the measured faster method: a check of how far
    a model fitted on one MLP carries to other decoders (its times do not transfer, so only
    the decision is compared; m is the matvec count CG took there)."""
    path = RESULTS / "step_cost.json"
    if not path.exists():
        return []
    cases = json.loads(path.read_text())["cases"]
    lines = [
        "",
        "Flows (whole ML steps from `bench/step_cost.py`, `bench/results/step_cost.json`; the",
        "explicit path, K = 1; m: CG's mean matvecs there, for information: both choices use",
        'the expected matvecs at d, as `method="auto"` does): the model\'s choice against the',
        "measured faster method.\n",
        "| case | d | B | exact ms | cg ms | m | measured faster | model | choose_method |",
        "|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    e, c = model["explicit"]["exact"], model["explicit"]["cg"]
    for name, row in cases.items():
        v = row["variants"]
        d, te, tc = row["d"], v["exact"]["median_ms"], v["cg"]["median_ms"]
        m = v["cg"].get("matvecs")
        if m is None:
            continue
        dd = min(max(d, DS[0]), DS[-1])  # the model's range, as choose_method clamps it
        expected = _interp_log2(AUTO_EXPECTED_MATVECS, dd)
        cheaper = np.dot(c, _features_cg(1, expected, dd)) < np.dot(e, _features_exact(dd))
        fitted = "cg" if cheaper else "exact"
        shipped = choose_method(d, 1, path="explicit")
        measured = "cg" if tc < te else "exact"
        lines.append(
            f"| {name} | {d} | {row['B']} | {te:.1f} | {tc:.1f} | {m:.1f} | {measured} "
            f"| {fitted} | {shipped} |"
        )
    return lines


def main() -> None:
    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="re-measure the timings")
    timings = measure_timings() if parser.parse_args().time else TIMINGS
    matvecs = measure_matvecs()
    model = fit(timings, matvecs)
    lines = [
        "Timings: one training step of the log det term, ms, MLP d -> 256 -> 256 -> 784, B = 64,",
        "float32 model, quiet 2-core CPU (the inputs of the fit; see bench/study_auto.py).\n",
        "| path | d | exact ms | cg K=1 ms | cg K=4 ms | matvecs K=1 | matvecs K=4 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path, rows in timings.items():
        for d, te, t1, t4 in rows:
            lines.append(
                f"| {path} | {d} | {te:.1f} | {t1:.1f} | {t4:.1f} | {matvecs[d, 1]:.1f} "
                f"| {matvecs[d, 4]:.1f} |"
            )
    lines += ["", "Fitted cost model (ms at B = 64):\n"]
    for path, m in model.items():
        e, c = m["exact"], m["cg"]
        lines.append(
            f"- {path}: exact = {e[0]:.3g} + {e[1]:.3g}·d + {e[2]:.3g}·d²; cg = {c[0]:.3g} + "
            f"{c[1]:.3g}·K + m·({c[2]:.3g} + {c[3]:.3g}·K) + {c[4]:.3g}·K·m³ + {c[5]:.3g}·K·m·d"
        )
    lines += [
        "",
        "Decisions: the faster measured method against the fitted model's choice, and the",
        "choice of `choose_method` with the constants shipped in `rnf_fast.engine.auto`.\n",
        "| path | d | K | measured faster | model | choose_method |",
        "|---|---:|---:|---|---|---|",
    ]
    agree = total = 0
    regret = 1.0
    for path, rows in timings.items():
        e, c = model[path]["exact"], model[path]["cg"]
        for d, te, t1, t4 in rows:
            pe = float(np.dot(e, _features_exact(d)))
            for K, t in ((1, t1), (4, t4)):
                pc = float(np.dot(c, _features_cg(K, matvecs[d, K], d)))
                measured = "cg" if t < te else "exact"
                fitted = "cg" if pc < pe else "exact"
                shipped = choose_method(d, K, path=path)
                agree += shipped == measured
                best = min(te, t)
                regret = max(regret, (t if shipped == "cg" else te) / best)
                total += 1
                lines.append(f"| {path} | {d} | {K} | {measured} | {fitted} | {shipped} |")
    lines += [
        "",
        f"`choose_method` agrees with the measured faster method in {agree}/{total}; where it "
        f"does not, its choice is at most {regret:.2f}× the faster one's time (near-ties).",
    ]
    lines += _flow_rows(model)
    lines += ["", f"Shipped constants: `AUTO_COST_MODEL = {AUTO_COST_MODEL}`"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "auto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
