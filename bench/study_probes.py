"""Hutchinson noise of the CG gradient by probe kind and K, against the exact gradient.

Two problems: the standard MLP problem at initialisation (``mlp-16-784``) and the trained
digits model (d = 10, D = 64, see ``bench/study_precond.py``) at z = g†(x) of a held-out batch
of 64, float64. For each probe kind and K, DRAWS single-draw gradients g (with respect to the
decoder's parameters and z) give the relative mean squared error

    E‖g - g_exact‖² / ‖g_exact‖²     (the estimator's total variance, relative),

with its standard error over the draws; the CG tolerance is tight (1e-8) so that only the
probes matter. Also with the Jacobi preconditioner, which changes the estimator (probes
L ε), to see its effect on the noise.

    python bench/study_probes.py   # writes bench/results/probes.md and probes.json
"""

import json
import warnings
from pathlib import Path

import torch
from harness import make_problem
from study_precond import trained_problem

from rnf_fast import logdet_grad
from rnf_fast.testing import grads

DRAWS = 24
KS = (1, 2, 4, 8)
KINDS = ("rademacher", "gaussian", "orthogonal")
RESULTS = Path(__file__).resolve().parent / "results"


def _problems():
    mlp = make_problem("mlp-16-784", truth=False)
    decoder = mlp.decoder.double()
    z = mlp.z.detach().double().requires_grad_(True)
    yield "mlp-16-784 (initialisation)", decoder, [*decoder.parameters(), z], z
    model, zs = trained_problem(torch.float64)
    z = zs[0].detach().requires_grad_(True)
    yield "digits d=10 (trained)", model.decode, [*model.f.parameters(), z], z


def _flat(value, inputs):
    return torch.cat([g.flatten() for g in grads(value, inputs)])


def _study(decoder, inputs, z):
    exact = _flat(logdet_grad(decoder, z, method="exact"), inputs)
    norm2 = float(exact.square().sum())
    rows = []
    configs = [(kind, K, None) for kind in KINDS for K in KS]
    configs += [("rademacher", K, "jacobi") for K in KS]
    for kind, K, prec in configs:
        errs = []
        for draw in range(DRAWS):
            value = logdet_grad(
                decoder,
                z,
                method="cg",
                probes=K,
                probe_kind=kind,
                generator=torch.Generator().manual_seed(draw),
                tol=1e-8,
                max_iter=4 * z.shape[1],
                preconditioner=prec,
            )
            errs.append(float((_flat(value, inputs) - exact).square().sum()) / norm2)
        e = torch.tensor(errs, dtype=torch.float64)
        rows.append(
            {
                "probe_kind": kind,
                "K": K,
                "preconditioner": prec,
                "rel_mse": float(e.mean()),
                "se": float(e.std() / DRAWS**0.5),
            }
        )
    return rows


def main() -> None:
    warnings.simplefilter("ignore")
    results = {}
    lines = []
    for name, decoder, inputs, z in _problems():
        rows = _study(decoder, inputs, z)
        results[name] = rows
        lines += [
            f"### {name}: E‖g - g_exact‖² / ‖g_exact‖² ± standard error ({DRAWS} draws)\n",
            "| probe kind | preconditioner | " + " | ".join(f"K = {K}" for K in KS) + " |",
            "|---|---|" + "---:|" * len(KS),
        ]
        for kind, prec in [(k, None) for k in KINDS] + [("rademacher", "jacobi")]:
            cells = [
                f"{r['rel_mse']:.3f} ± {r['se']:.3f}"
                for r in rows
                if r["probe_kind"] == kind and r["preconditioner"] == prec
            ]
            lines.append(f"| {kind} | {prec or 'none'} | " + " | ".join(cells) + " |")
        lines.append("")
        print("\n".join(lines[-8:]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "probes.md").write_text("\n".join(lines))
    (RESULTS / "probes.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
