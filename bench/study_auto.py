"""Exact against CG as d grows (MLP decoder d -> 256 -> 256 -> 784, B = 64, float32).

Times one training step of the log det term (median of several, both methods interleaved in one
run, so the ratio is robust to machine noise); the crossover sets ``method="auto"``.

    python bench/study_auto.py > bench/results/auto.md
"""

import time
import warnings

from rnf_fast import logdet_grad
from rnf_fast.benchmarks import make_problem

DS = [4, 8, 16, 32, 64, 128, 256]
ROUNDS = 7


def _step(problem, **kw):
    def run():
        for p in problem.decoder.parameters():
            p.grad = None
        logdet_grad(problem.decoder, problem.z, **kw).sum().backward()

    return run


def main() -> None:
    warnings.simplefilter("ignore")
    print("| d | exact ms | cg K=1 ms | cg K=4 ms | exact / cg K=1 | exact / cg K=4 |")
    print("|---:|---:|---:|---:|---:|---:|")
    for d in DS:
        problem = make_problem("mlp-16-784", d=d)
        runs = {
            "exact": _step(problem, method="exact"),
            "cg1": _step(problem, method="cg", probes=1),
            "cg4": _step(problem, method="cg", probes=4),
        }
        times = {k: [] for k in runs}
        for _ in range(ROUNDS + 1):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        med = {k: sorted(v[1:])[ROUNDS // 2] * 1e3 for k, v in times.items()}
        print(
            f"| {d} | {med['exact']:.1f} | {med['cg1']:.1f} | {med['cg4']:.1f} "
            f"| {med['exact'] / med['cg1']:.2f} | {med['exact'] / med['cg4']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
