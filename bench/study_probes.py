"""Hutchinson noise of the CG gradient by probe kind (standard MLP problem, K = 1).

The relative error ‖g - g_exact‖ / ‖g_exact‖ of single-draw gradients, averaged over draws,
with the CG tolerance tight enough that only the probes matter.

    python bench/study_probes.py > bench/results/probes.md
"""

import torch

from rnf_fast import logdet_grad
from rnf_fast.benchmarks import make_problem
from rnf_fast.testing import grads, rel_error

DRAWS = 16


def main() -> None:
    problem = make_problem("mlp-16-784")
    inputs = [*problem.decoder.parameters(), problem.z]
    exact = torch.cat([g.flatten() for g in problem.truth_grads])
    print("| probe kind | K | mean relative gradient error (Hutchinson noise) |")
    print("|---|---:|---:|")
    for kind in ("gaussian", "rademacher", "orthogonal"):
        for K in (1, 4):
            errs = []
            for draw in range(DRAWS):
                gen = torch.Generator().manual_seed(draw)
                v = logdet_grad(
                    problem.decoder,
                    problem.z,
                    method="cg",
                    probes=K,
                    probe_kind=kind,
                    generator=gen,
                    tol=1e-8,
                    max_iter=64,
                )
                g = torch.cat([x.flatten() for x in grads(v, inputs)]).double()
                errs.append(rel_error(g, exact))
            print(f"| {kind} | {K} | {sum(errs) / len(errs):.3f} |", flush=True)


if __name__ == "__main__":
    main()
