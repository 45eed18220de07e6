"""Exact against CG as d grows, on both linearization paths: the data behind ``method="auto"``.

MLP decoder d -> 256 -> 256 -> 784 (tanh), B = 64, float32: one training step of the log det
term, median of several rounds with all contenders interleaved in one run, so the ratios are
robust to machine noise. ``explicit`` is the nn.Sequential fast path, ``generic`` the torch.func
path (forced with ``batching="vmap"``).

    python bench/study_auto.py > bench/results/auto.md
"""

import time
import warnings

from rnf_fast import logdet_grad
from rnf_fast.benchmarks import make_problem

DS = [4, 8, 16, 32, 64, 128, 256]
ROUNDS = 5


def _step(problem, **kw):
    def run():
        for p in problem.decoder.parameters():
            p.grad = None
        logdet_grad(problem.decoder, problem.z, **kw).sum().backward()

    return run


def main() -> None:
    warnings.simplefilter("ignore")
    print("| path | d | exact ms | cg K=1 ms | cg K=4 ms | exact / cg K=1 | exact / cg K=4 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for path, batching in (("explicit", "auto"), ("generic", "vmap")):
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
            med = {k: sorted(v[2:])[rounds // 2] * 1e3 for k, v in times.items()}
            print(
                f"| {path} | {d} | {med['exact']:.1f} | {med['cg1']:.1f} | {med['cg4']:.1f} "
                f"| {med['exact'] / med['cg1']:.2f} | {med['exact'] / med['cg4']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
