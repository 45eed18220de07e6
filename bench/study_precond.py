"""CG iterations with and without preconditioning and warm starts, on a trained model.

The model is the committed digits run (d = 10, D = 64, 8 affine couplings, trained 40 epochs
with the CG estimator): its decoder at z = g†(x) of held-out (test, then validation) batches
(B = 64), float32 model, float64 CG, the default tolerance 1e-2, Rademacher probes. Iteration
counts do not depend on the machine's load; only counts are reported.

Extra cost of each preconditioner, in decoder rows pushed (a tangent or cotangent row costs
about one primal row on the explicit path): ``jacobi`` B·d tangent rows, ``batch`` 4·d
tangent rows plus a 4-row primal, ``cached`` nothing (the mean JᵀJ of the previous
batch, kept by the caller from an earlier exact evaluation). One CG iteration costs 2·B·K rows.

    python bench/study_precond.py   # writes bench/results/precond.md and precond.json
"""

import json
import warnings
from pathlib import Path

import torch
from harness import make_problem

from rnf_fast import logdet_grad
from rnf_fast.runs import _load_data, _load_run, _prepare
from rnf_fast.testing import dense_jacobian

RUN = Path(__file__).resolve().parents[1] / "runs" / "quality" / "digits" / "ML__cg_K=1-seed0"
RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = 4
B = 64


def trained_problem(dtype: torch.dtype = torch.float32):
    """The trained digits model (eval mode, ``dtype``) and ``BATCHES`` test batches of z (B, d)."""
    config, model, st = _load_run(RUN)
    model = model.eval().to(dtype)
    ds = _load_data(config)
    x = torch.cat([_prepare(ds.test, ds, st, seed=7), _prepare(ds.val, ds, st, seed=7)])
    x = x.to(dtype)
    with torch.no_grad():
        zs = [model.encode(x[i * B : (i + 1) * B]) for i in range(BATCHES + 1)]
    return model, zs


def mean_gram(decoder, z):
    """The batch's mean JᵀJ (d, d) in float64, from the dense Jacobian
    (:func:`rnf_fast.testing.dense_jacobian`)."""
    J = dense_jacobian(decoder, z.detach())
    return (J.transpose(1, 2) @ J).double().mean(0)


def _iterations(decoder, z, K, **kw):
    """(mean iterations per system, batched matvecs, info) of one CG solve."""
    gen = torch.Generator().manual_seed(0)
    V = torch.sign(torch.randn(z.shape[0], K, z.shape[1], generator=gen))
    _, info = logdet_grad(decoder, z, method="cg", probes=V, return_info=True, **kw)
    return info.cg.iterations.double().mean().item(), info.cg.matvecs, info


def _trained_rows(model, zs, d):
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    for K in (1, 4):
        for name in ("none", "jacobi", "batch", "cached"):
            its, mvs = [], []
            for i in range(1, BATCHES + 1):
                prec = {"none": None, "jacobi": "jacobi", "batch": "batch"}.get(name)
                if name == "cached":
                    prec = mean_gram(model.decode, zs[i - 1])
                it, mv, _ = _iterations(model.decode, zs[i], K, preconditioner=prec)
                its.append(it)
                mvs.append(mv)
            rows.setdefault(name, {})[K] = (sum(its) / len(its), sum(mvs) / len(mvs))
    return rows


def _warm_start(model, zs, d):
    """Same batch and probes after one Adam step (lr 3e-4, the training setting) on the log det
    loss; x0 = the previous step's solution."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    warm = {"cold": [], "warm": [], "cold matvecs": [], "warm matvecs": []}
    for i in range(1, BATCHES + 1):
        z = zs[i]
        _, _, info = _iterations(model.decode, z, 1)
        V = torch.sign(torch.randn(z.shape[0], 1, d, generator=torch.Generator().manual_seed(0)))
        opt.zero_grad()
        logdet_grad(model.decode, z, method="cg", probes=V).mean().backward()
        opt.step()
        it, mv, _ = _iterations(model.decode, z, 1)
        warm["cold"].append(it)
        warm["cold matvecs"].append(mv)
        it, mv, _ = _iterations(model.decode, z, 1, x0=info.cg.solution)
        warm["warm"].append(it)
        warm["warm matvecs"].append(mv)
    return {k: sum(v) / len(v) for k, v in warm.items()}


def _untrained_rows():
    """The standard MLP at initialisation, d = 128 (CG needs ~75 matvecs there), K = 1."""
    problem = make_problem("mlp-16-784", d=128, truth=False)
    rows = {}
    for name in ("none", "jacobi", "batch"):
        prec = None if name == "none" else name
        it, mv, _ = _iterations(problem.decoder, problem.z.detach(), 1, preconditioner=prec)
        rows[name] = (it, mv)
    return rows


def main() -> None:
    warnings.simplefilter("ignore")
    model, zs = trained_problem()
    d = zs[0].shape[1]
    rows = _trained_rows(model, zs, d)
    warm = _warm_start(model, zs, d)
    untrained = _untrained_rows()
    lines = [
        f"Trained digits model (d = {d}, D = 64), {BATCHES} held-out batches of B = {B}, tol "
        "1e-2, Rademacher probes: mean CG iterations per system / batched matvecs (the slowest "
        "system; what the step costs). `cached`: the mean JᵀJ of the previous batch.\n",
        "| preconditioner | K = 1 | K = 4 | extra rows | rows saved at K = 1 | at K = 4 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    extra = {"none": 0, "jacobi": B * d, "batch": 4 * d + 4, "cached": 0}
    for name, r in rows.items():
        saved = [2 * B * K * (rows["none"][K][1] - r[K][1]) for K in (1, 4)]
        lines.append(
            f"| {name} | {r[1][0]:.2f} / {r[1][1]:.2f} | {r[4][0]:.2f} / {r[4][1]:.2f} "
            f"| {extra[name]} | {saved[0]:.0f} | {saved[1]:.0f} |"
        )
    lines += [
        "",
        "Warm start after one Adam step (lr 3e-4) on the same batch and probes, K = 1: "
        f"{warm['cold']:.2f} iterations / {warm['cold matvecs']:.2f} matvecs from zero, "
        f"{warm['warm']:.2f} / {warm['warm matvecs']:.2f} from the previous solution (the "
        "matvecs include the initial residual's).",
        "",
        "Standard MLP d -> 256 -> 256 -> 784 at initialisation, d = 128, B = 64, K = 1 "
        "(ill-conditioned: CG's hard case):\n",
        "| preconditioner | iterations | matvecs | extra rows |",
        "|---|---:|---:|---:|",
    ]
    for name, (it, mv) in untrained.items():
        extra_rows = {"none": 0, "jacobi": 64 * 128, "batch": 4 * 128 + 4}[name]
        lines.append(f"| {name} | {it:.2f} | {mv} | {extra_rows} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "precond.md").write_text("\n".join(lines) + "\n")
    payload = {"trained": rows, "extra_rows": extra, "warm_start": warm, "untrained": untrained}
    (RESULTS / "precond.json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
