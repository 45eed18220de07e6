"""How tight must CG be? Its bias in the gradient against the Hutchinson noise, per tolerance.

For the same probes, the CG error of the gradient is ‖g(tol) - g(tol=1e-10)‖ and the Hutchinson
noise is ‖g(tol=1e-10) - g_exact‖. The default tolerance is the loosest one whose CG error stays
well below the noise (K = 1, the standard MLP problem, float32 model, float64 CG).

    python bench/study_cg_tol.py > bench/results/cg_tol.md
"""

import torch
from harness import make_problem

from rnf_fast import logdet_grad
from rnf_fast.testing import grads, rel_error

TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4]
DRAWS = 8


def main() -> None:
    problem = make_problem("mlp-16-784")
    dec, z = problem.decoder, problem.z
    inputs = [*dec.parameters(), z]

    def flat_grad(**kw):
        v, info = logdet_grad(dec, z, method="cg", return_info=True, **kw)
        return torch.cat([g.flatten() for g in grads(v, inputs)]).double(), info

    exact = torch.cat([g.flatten() for g in problem.truth_grads])
    rows = {t: [] for t in TOLS}
    noise, iters = [], {t: [] for t in TOLS}
    for draw in range(DRAWS):
        V = torch.randn(z.shape[0], 1, z.shape[1], generator=torch.Generator().manual_seed(draw))
        ref, _ = flat_grad(probes=V, tol=1e-10, max_iter=64)
        noise.append(rel_error(ref, exact))
        for t in TOLS:
            g, info = flat_grad(probes=V, tol=t, max_iter=64)
            rows[t].append(rel_error(g, ref))
            iters[t].append(info.cg.iterations.float().mean().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"Hutchinson noise (K=1), relative to the exact gradient: {mean(noise):.3f}\n")
    print("| tol | CG error / exact gradient | CG error / Hutchinson noise | mean iterations |")
    print("|---:|---:|---:|---:|")
    for t in TOLS:
        print(
            f"| {t:g} | {mean(rows[t]):.2e} | {mean(rows[t]) / mean(noise):.2e} "
            f"| {mean(iters[t]):.1f} |"
        )


if __name__ == "__main__":
    main()
