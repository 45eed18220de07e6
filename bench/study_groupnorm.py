"""The GroupNorm tangent rule: the fused rule (``_GroupNormTangent``'s written-out backward,
``_project`` without a graph) against the plain formula it replaced (autograd through it).

    OMP_NUM_THREADS=1 python bench/study_groupnorm.py              # 15 rounds, prints a table
    OMP_NUM_THREADS=1 python bench/study_groupnorm.py --rounds 5 --sizes 7

Shapes of the ``mnist5k`` preset's ConvResNet conditioners: B = 32 samples, K = 20 tangents
(the exact path's d), C = 8 channels in gcd(8, C) = 8 groups, H = W = 28 (the first scale's
checkerboard coupling), 14 (the other couplings) or 7, float32, one thread. Per size and
round, interleaved: the differentiable tangent (forward, then the gradient of ⟨W, J T⟩ with
respect to T, x̂, 1/σ and γ, as the exact path's backward takes it) and the no-graph jvp and
vjp (CG's products), old then new. Before timing, each size checks the new rule against the
old: products and gradients within 1e-5 relative (float32), and at a small float64 shape within
1e-12. Prints medians and the median of the per-round ratios old / new; indicative only on a
shared machine (compare ratios from one run, never absolute times across runs).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import Tensor

from rnf_fast.linearize.modules import _GroupNorm
from rnf_fast.testing import GroupNormTangentReference, rel_error


def _case(B: int, K: int, C: int, size: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Factors of a GroupNorm at a random input (x̂, 1/σ, γ leaves that require grad), the
    tangents T and the cotangents W, both (B, K, C, size, size)."""
    g = torch.Generator().manual_seed(seed)
    G = math.gcd(8, C)
    x = torch.randn(B, G, C // G * size * size, generator=g, dtype=dtype)
    centred = x - x.mean(-1, keepdim=True)
    inv_std = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + 1e-5)
    shape = (B, K, C, size, size)
    return {
        "G": G,
        "xhat": (centred * inv_std).requires_grad_(),
        "inv_std": inv_std.requires_grad_(),
        "weight": (1 + 0.3 * torch.randn(C, generator=g, dtype=dtype)).requires_grad_(),
        "T": torch.randn(shape, generator=g, dtype=dtype).requires_grad_(),
        "W": torch.randn(shape, generator=g, dtype=dtype),
    }


def _rules(case: dict) -> dict:
    f = case["xhat"], case["inv_std"], case["weight"]
    old = GroupNormTangentReference(*f, case["G"])
    return {"old": old, "new": _GroupNorm(*f, case["T"].shape[2:])}


def _graph_step(lin, case: dict) -> tuple[Tensor, ...]:
    """J T with its graph, then ∇⟨W, J T⟩ with respect to T, x̂, 1/σ and γ."""
    u = lin.jvp(case["T"])
    wrt = [case["T"], case["xhat"], case["inv_std"], case["weight"]]
    return (u.detach(), *torch.autograd.grad(u, wrt, case["W"]))


def _no_grad(product, X: Tensor) -> Tensor:
    with torch.no_grad():
        return product(X)


def _products(lin, case: dict) -> tuple[Tensor, Tensor]:
    return _no_grad(lin.jvp, case["T"]), _no_grad(lin.vjp, case["W"])


def verify(case: dict, tol: float) -> None:
    rules = _rules(case)
    old = (*_graph_step(rules["old"], case), *_products(rules["old"], case))
    new = (*_graph_step(rules["new"], case), *_products(rules["new"], case))
    names = ("jvp", "grad T", "grad x̂", "grad 1/σ", "grad γ", "no-grad jvp", "no-grad vjp")
    for name, a, b in zip(names, new, old, strict=True):
        err = rel_error(a, b)
        if not err <= tol:
            raise RuntimeError(f"{name}: the new rule is {err:.1e} off the old (tolerance {tol})")


def _time(fn, lin) -> float:
    t0 = time.perf_counter()
    fn(lin)
    return (time.perf_counter() - t0) * 1e3


def measure(size: int, rounds: int, B: int = 32, K: int = 20, C: int = 8) -> dict:
    case = _case(B, K, C, size, torch.float32)
    verify(case, 1e-5)
    rules = _rules(case)
    tasks = {
        "graph": lambda lin: _graph_step(lin, case),
        "jvp": lambda lin: _no_grad(lin.jvp, case["T"]),
        "vjp": lambda lin: _no_grad(lin.vjp, case["W"]),
    }
    times = {(task, rule): [] for task in tasks for rule in rules}
    for fn in tasks.values():  # warm-up (the new rule forms its no-graph factors once)
        for lin in rules.values():
            fn(lin)
    for _ in range(rounds):
        for task, fn in tasks.items():
            for rule, lin in rules.items():
                times[task, rule].append(_time(fn, lin))
    row = {"size": size}
    for task in tasks:
        old, new = times[task, "old"], times[task, "new"]
        row[task] = (
            statistics.median(old),
            statistics.median(new),
            statistics.median(a / b for a, b in zip(old, new, strict=True)),
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 14, 7])
    args = parser.parse_args()
    torch.set_num_threads(1)
    verify(_case(2, 3, 12, 3, torch.float64), 1e-12)  # 3 channels per group, float64
    print(f"B = 32, K = 20, C = 8 (8 groups), float32, 1 thread, {args.rounds} rounds")
    print("| H = W | task | old ms | new ms | old / new |")
    print("|---:|---|---:|---:|---:|")
    for size in args.sizes:
        row = measure(size, args.rounds)
        for task in ("graph", "jvp", "vjp"):
            old, new, ratio = row[task]
            print(f"| {size} | {task} | {old:.2f} | {new:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
