"""How tight must CG be? Bias of the gradient against Hutchinson noise, per stopping rule.

On the standard MLP problem (16 -> 256 -> 256 -> 784, B = 64, float32 model, float64 CG, K = 1
Rademacher probe, the library's default), for N probe draws ε_i, each rule's gradient g_rule(ε_i)
is compared with the same probes' converged CG gradient g_ref(ε_i) (tol 1e-10) and with the exact
gradient g (Cholesky, float64 truth):

- bias: ‖mean_i (g_rule(ε_i) - g_ref(ε_i))‖ / ‖g‖, what a training run's mean gradient keeps
  however many steps it averages (± its standard error: the per-probe CG error / √N);
- CG error per probe: rms_i ‖g_rule(ε_i) - g_ref(ε_i)‖ / ‖g‖;
- total error: rms_i ‖g_rule(ε_i) - g‖ / ‖g‖ (Hutchinson noise and CG error together);
- matvecs: batched JᵀJ products per call (the slowest system's iterations).

Rules: the tolerance (the default and looser), fixed iteration counts, and randomized truncation
(:class:`rnf_fast.engine.truncation.Roulette`: unbiased for the tolerance-stopped iterate).

    python bench/study_cg_tol.py [--draws 512] > bench/results/cg_tol.md
"""

import argparse
import math
import warnings

import torch
from harness import make_problem

from rnf_fast import logdet_grad, make_probes
from rnf_fast.engine.truncation import Roulette
from rnf_fast.testing import grads

RULES: list[tuple[str, dict]] = [
    ("tol 1e-2 (default)", {"tol": 1e-2}),
    ("tol 3e-2", {"tol": 3e-2}),
    ("tol 1e-1", {"tol": 1e-1}),
    ("fixed 3", {"tol": 0.0, "max_iter": 3}),
    ("fixed 4", {"tol": 0.0, "max_iter": 4}),
    ("fixed 5", {"tol": 0.0, "max_iter": 5}),
    ("roulette(2, 0.5), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(2, 0.5)}),
    ("roulette(3, 0.5), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(3, 0.5)}),
    ("roulette(4, 0.5), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(4, 0.5)}),
    ("roulette(3, 0.6), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(3, 0.6)}),
    ("roulette(2, 0.7), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(2, 0.7)}),
    ("roulette(8, 0.5), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(8, 0.5)}),
    ("roulette(12, 0.5), tol 1e-2", {"tol": 1e-2, "truncation": Roulette(12, 0.5)}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=512, help="probe draws N (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes (default 0)")
    parser.add_argument(
        "--problem", default="mlp-16-784", help="a harness problem (default: the standard MLP)"
    )
    parser.add_argument(
        "--rules", nargs="+", metavar="NAME", help="only the rules whose name starts so"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # fixed counts and truncations stop short on purpose
    problem = make_problem(args.problem)
    rules = [r for r in RULES if not args.rules or any(r[0].startswith(x) for x in args.rules)]
    dec, z = problem.decoder, problem.z
    inputs = [*problem.params, z]
    exact = torch.cat([g.flatten() for g in problem.truth_grads])
    scale = exact.norm().item()
    B, d = z.shape
    gen = torch.Generator().manual_seed(args.seed)
    rule_gen = torch.Generator().manual_seed(args.seed + 1)

    def flat_grad(V: torch.Tensor, **kw) -> tuple[torch.Tensor, object]:
        if "truncation" in kw:
            kw = {**kw, "generator": rule_gen}
        v, info = logdet_grad(dec, z, "cg", probes=V, return_info=True, **kw)
        return torch.cat([g.flatten() for g in grads(v, inputs)]).double(), info

    stats = {name: {"diff": 0.0, "sq": 0.0, "tot": 0.0, "mv": 0.0} for name, _ in rules}
    noise = 0.0
    for _ in range(args.draws):
        V = make_probes(B, 1, d, generator=gen)
        ref, _ = flat_grad(V, tol=1e-10, max_iter=max(64, 10 * d))
        noise += ((ref - exact).norm().item() / scale) ** 2
        for name, kw in rules:
            g, info = flat_grad(V, **kw)
            row = stats[name]
            row["diff"] = row["diff"] + (g - ref)
            row["sq"] += ((g - ref).norm().item() / scale) ** 2
            row["tot"] += ((g - exact).norm().item() / scale) ** 2
            row["mv"] += info.cg.matvecs
    n = args.draws
    print(
        f"{problem.spec.about} ({args.problem}; B = {B}, d = {d}), K = 1 Rademacher probe, "
        f"{n} probe draws (seed {args.seed}); errors relative to the exact gradient's norm. "
        f"Hutchinson noise alone (converged CG): {math.sqrt(noise / n):.3f} rms.\n"
    )
    print(
        "| rule | matvecs | bias (± s.e.) | CG error per probe | total error | "
        "bias / noise of a 1,000-step mean |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in rules:
        row = stats[name]
        bias = (row["diff"] / n).norm().item() / scale
        per_probe = math.sqrt(row["sq"] / n)
        mean_noise = math.sqrt(noise / n) / math.sqrt(1000)
        bias_se = 100 * per_probe / math.sqrt(n)
        print(
            f"| {name} | {row['mv'] / n:.2f} | {100 * bias:.2f}% ± {bias_se:.2f}% "
            f"| {100 * per_probe:.2f}% | {math.sqrt(row['tot'] / n):.3f} "
            f"| {bias / mean_noise:.2f} |"
        )


if __name__ == "__main__":
    main()
