"""Cost of one JᵀJ product of the linearized operator against one forward + backward pass.

    python bench/study_matvec.py          # writes bench/results/matvec.json and .md

For each problem: ``rnf_fast.linearize(decoder, z)`` once, then ``gram_mv`` with K = 1 probe
(J v then Jᵀ(J v), no primal, no graph) against a plain training pass of the decoder at the same
batch (forward, sum, backward to its parameters and z), and the generic ``torch.func``
linearization's ``gram_mv`` beside it. Each product is checked against the dense Jacobian of a
few samples before timing. The cases are interleaved within each round; medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from harness import machine_info, make_problem

from rnf_fast import linearize
from rnf_fast.linearize import FuncLinearization
from rnf_fast.testing import dense_jacobian, rel_error

PROBLEMS = ("mlp-16-784", "mlp-64-784", "flow-miniboone", "flow-power")
RESULTS = Path(__file__).parent / "results"


def _check(lin, decoder, z, V) -> None:
    """J v and Jᵀ J v of the first samples against the dense Jacobian (float32 accuracy)."""
    n = min(4, z.shape[0])
    J = dense_jacobian(decoder, z[:n].detach())
    JV, AV = lin.gram_mv(V)
    expected = torch.einsum("bDd,bkd->bkD", J, V[:n])
    assert rel_error(JV[:n], expected) < 1e-4, "J v does not match the dense Jacobian"
    back = torch.einsum("bDd,bkD->bkd", J, expected)
    assert rel_error(AV[:n], back) < 1e-4, "Jᵀ J v does not match the dense Jacobian"


def _time(fn, rounds: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - t0) / rounds * 1e3


def measure(name: str, rounds: int, repeats: int) -> dict:
    problem = make_problem(name, truth=False)
    decoder, z = problem.decoder, problem.z.detach()
    params = [p for p in decoder.parameters() if p.requires_grad]
    V = torch.randn(z.shape[0], 1, z.shape[1], generator=torch.Generator().manual_seed(0))
    lin = linearize(decoder, z)
    generic = FuncLinearization(decoder, z, batching="vmap")
    with torch.no_grad():
        _check(lin, decoder, z, V)
        _check(generic, decoder, z, V)

    def forward_backward() -> None:
        zz = z.clone().requires_grad_()
        torch.autograd.grad(decoder(zz).sum(), [zz, *params], allow_unused=True)

    cases = {
        "forward+backward": forward_backward,
        "gram_mv (linearized)": lambda: lin.gram_mv(V),
        "gram_mv (torch.func)": lambda: generic.gram_mv(V),
    }
    # CG's own product where the linearization has one (MLPs ending in a narrow Linear:
    # Jᵀ J v = Mᵀ (WᵀW) M v), checked against gram_mv first.
    hidden = getattr(lin, "gram_mv_hidden", None)
    if callable(hidden) and hidden(V) is not None:
        with torch.no_grad():
            assert rel_error(hidden(V)[1], lin.gram_mv(V)[1]) < 1e-4, "hidden product differs"
        cases["CG product (hidden space)"] = lambda: hidden(V)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for key, fn in cases.items():
            samples[key].append(_time(fn, repeats))
    ms = {k: statistics.median(v) for k, v in samples.items()}
    hidden_ms = ms.get("CG product (hidden space)")
    return {
        "problem": name,
        "hidden_over_fb": None if hidden_ms is None else hidden_ms / ms["forward+backward"],
        "B": problem.spec.B,
        "d": problem.spec.d,
        "D": problem.spec.D,
        "batching": getattr(lin, "batching", "?"),
        "ms": ms,
        "linearized_over_fb": ms["gram_mv (linearized)"] / ms["forward+backward"],
        "func_over_fb": ms["gram_mv (torch.func)"] / ms["forward+backward"],
    }


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {m.get('cpu', '?')}, {m.get('threads', '?')} threads, "
        f"torch {m.get('torch', '?')}; commit {m.get('commit', '?')}.",
        "",
        "| problem | B, d, D | path | forward+backward ms | gram_mv ms | gram_mv / (fwd+bwd) | "
        "CG product ms | CG product / (fwd+bwd) | torch.func gram_mv ms | "
        "torch.func / (fwd+bwd) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ms = r["ms"]
        hidden = ms.get("CG product (hidden space)")
        cg = (
            f"{hidden:.2f} | {r['hidden_over_fb']:.2f}"
            if hidden is not None
            else f"{ms['gram_mv (linearized)']:.2f} | {r['linearized_over_fb']:.2f}"
        )
        lines.append(
            f"| {r['problem']} | {r['B']}, {r['d']}, {r['D']} | {r['batching']} | "
            f"{ms['forward+backward']:.2f} | "
            f"{ms['gram_mv (linearized)']:.2f} | {r['linearized_over_fb']:.2f} | {cg} | "
            f"{ms['gram_mv (torch.func)']:.2f} | {r['func_over_fb']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = [measure(name, args.rounds, args.repeats) for name in args.problems]
    results = {"machine": machine_info(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "matvec.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (RESULTS / "matvec.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
