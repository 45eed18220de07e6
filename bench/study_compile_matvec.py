"""Would ``torch.compile`` speed up CG's matvec on the image flow? The MNIST preset's J^T J product.

The matvec ``lin.gram_mv(Q)`` of the MNIST preset's decoder (d = 20, B = 32, one probe) is
compiled with ``torch.compile`` and compared with the eager product: first the results are
checked equal (float32 rounding), then both are timed interleaved over several training-like
steps, each step a new linearization at a new z (what CG sees from one training step to the
next), and dynamo's counters say whether the compiled function recompiled across steps.

    OMP_NUM_THREADS=1 .venv/bin/python bench/study_compile_matvec.py [--steps 7] [--reps 3]

Use one thread and a quiet machine (DESIGN.md §7); the first compile takes a minute or more.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo as dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_cost import _mnist, _perturbed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="new linearizations timed")
    parser.add_argument("--reps", type=int, default=3, help="products per linearization")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, x, _ = _mnist()
    model = _perturbed(model, x)
    decoder = model.decoder

    def linearization(step: int):
        with torch.no_grad():
            return decoder.linearize(model.encode(x + 1e-3 * step))

    def matvec(lin, Q):
        return lin.gram_mv(Q)

    compiled = torch.compile(matvec, dynamic=False)
    lin = linearization(0)
    B, d = lin.z.shape
    Q = torch.randn(B, 1, d, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    got = compiled(lin, Q)[1]
    first = time.perf_counter() - start
    want = matvec(lin, Q)[1]
    err = float((got - want).abs().max() / want.abs().max())
    if err > 1e-5:
        raise AssertionError(f"compiled matvec differs from the eager one: {err:.2e}")
    dynamo.utils.counters.clear()
    eager, fast = [], []
    for step in range(1, args.steps + 1):
        lin = linearization(step)
        Q = torch.randn(B, 1, d, generator=torch.Generator().manual_seed(step))
        for _ in range(args.reps):
            start = time.perf_counter()
            matvec(lin, Q)
            eager.append(time.perf_counter() - start)
            start = time.perf_counter()
            compiled(lin, Q)
            fast.append(time.perf_counter() - start)
    graphs = dynamo.utils.counters["stats"].get("unique_graphs", 0)
    e, c = statistics.median(eager), statistics.median(fast)
    print(f"first call (compile) {first:.1f} s; max relative difference {err:.1e}")
    print(f"graphs compiled over {args.steps} new linearizations after the first: {graphs}")
    print(f"eager {1e3 * e:.2f} ms, compiled {1e3 * c:.2f} ms per product: {e / c:.2f}x")


if __name__ == "__main__":
    main()
