"""Benchmark problems and contenders, shared by ``bench/`` (pytest-benchmark) and the CLI.

A *problem* is a decoder, a batch of latents and the float64 dense truth of log det(JᵀJ) and its
gradients. A *contender* turns a problem into a training-step closure (forward, log det term,
backward). Every contender is verified against the truth before it is timed
(:func:`verify`); peak memory is measured in a fresh process per case (:func:`peak_memory`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import logdet_grad
from .baselines import dense_logdet, logdet_jacfwd, logdet_jacrev
from .testing import grads, mlp_decoder, rel_error

__all__ = [
    "CONTENDERS",
    "PROBLEMS",
    "Problem",
    "RNF_CONTENDERS",
    "report_markdown",
    "machine_info",
    "make_problem",
    "make_step",
    "peak_memory",
    "verify",
]


@dataclass(frozen=True)
class ProblemSpec:
    """A named problem size: an MLP decoder d -> hidden -> D with tanh, batch B."""

    d: int
    D: int
    B: int
    hidden: tuple[int, ...]


PROBLEMS: dict[str, ProblemSpec] = {
    # The standard problem: the paper's MNIST-sized MLP decoder.
    "mlp-16-784": ProblemSpec(d=16, D=784, B=64, hidden=(256, 256)),
    # Wide decoder where the tangents' graph, not J, dominates memory: the chunking study.
    "mlp-64-784-wide": ProblemSpec(d=64, D=784, B=64, hidden=(1024, 1024)),
    # Tiny version for CI: same code paths, runs in milliseconds.
    "quick": ProblemSpec(d=3, D=10, B=4, hidden=(8, 8)),
}


@dataclass
class Problem:
    """A decoder, latents and the float64 dense truth at them."""

    name: str
    spec: ProblemSpec
    decoder: nn.Module
    z: Tensor
    truth_value: Tensor
    truth_grads: list[Tensor]


def make_problem(name: str, *, d: int | None = None, seed: int = 0, truth: bool = True) -> Problem:
    """Build the named problem (optionally with another latent dimension d), in float32,
    with its float64 truth (skipped with ``truth=False``: empty truth fields)."""
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {name!r}")
    spec = PROBLEMS[name]
    if d is not None:
        spec = ProblemSpec(d=d, D=spec.D, B=spec.B, hidden=spec.hidden)
    decoder = mlp_decoder(spec.d, spec.D, hidden=spec.hidden, dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    z64 = torch.randn(spec.B, spec.d, generator=g, dtype=torch.float64, requires_grad=True)
    z = z64.detach().float().requires_grad_(True)
    if not truth:
        return Problem(name, spec, decoder.float(), z, torch.empty(0), [])
    value = dense_logdet(decoder, z64)
    truth_grads = grads(value, [*decoder.parameters(), z64])
    return Problem(name, spec, decoder.float(), z, value.detach(), truth_grads)


RNF_CONTENDERS: dict[str, dict] = {
    "rnf_fast exact": {"method": "exact"},
    "rnf_fast exact chunk=16": {"method": "exact", "chunk_size": 16},
    "rnf_fast exact chunk=4": {"method": "exact", "chunk_size": 4},
    "rnf_fast cg K=1": {"method": "cg", "probes": 1},
    "rnf_fast cg K=4": {"method": "cg", "probes": 4},
    "rnf_fast auto": {"method": "auto"},
    "rnf_fast exact, generic path": {"method": "exact", "batching": "vmap"},
    "rnf_fast cg K=1, generic path": {"method": "cg", "probes": 1, "batching": "vmap"},
}
"""rnf_fast configurations: the keyword arguments of :func:`rnf_fast.logdet_grad`."""


def _rnf(kwargs: dict) -> Callable[[nn.Module, Tensor], Tensor]:
    return lambda decoder, z: logdet_grad(decoder, z, **kwargs)


CONTENDERS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    **{name: _rnf(kwargs) for name, kwargs in RNF_CONTENDERS.items()},
    "forward-mode (vmap(jacfwd))": logdet_jacfwd,
    "reverse-mode (vmap(jacrev))": logdet_jacrev,
}
"""Each maps (decoder, z) to the (B,) log det(JᵀJ) term with its gradient attached."""


def make_step(problem: Problem, contender: str) -> Callable[[], Tensor]:
    """A training-step closure: zero grads, log det term, backward; returns the value."""
    fn = CONTENDERS[contender]
    params = list(problem.decoder.parameters())

    def step() -> Tensor:
        for p in params:
            p.grad = None
        problem.z.grad = None
        value = fn(problem.decoder, problem.z)
        value.sum().backward()
        return value.detach()

    return step


def verify(problem: Problem, contender: str) -> dict[str, float]:
    """Run one step and compare with the float64 truth.

    Exact contenders must match it to float32 accuracy (value 1e-4, gradients 1e-3 relative)
    or this raises. A stochastic contender is checked the way its math promises: with K = d
    scaled orthonormal probes and a tight tolerance it must reproduce the exact gradient; its
    own single-draw errors (the Hutchinson noise) are reported, not bounded.

    Returns:
        ``{"value_rel_err": ..., "grad_rel_err": ...}`` of the timed configuration.
    """
    step = make_step(problem, contender)
    value = step()
    got = [
        torch.zeros_like(p) if p.grad is None else p.grad.double()
        for p in [*problem.decoder.parameters(), problem.z]
    ]
    flat_got = torch.cat([g.flatten() for g in got])
    flat_true = torch.cat([g.flatten() for g in problem.truth_grads])
    errors = {
        "value_rel_err": rel_error(value.double(), problem.truth_value),
        "grad_rel_err": rel_error(flat_got, flat_true),
    }
    kwargs = RNF_CONTENDERS.get(contender)
    method = None
    if kwargs is not None:
        _, info = logdet_grad(problem.decoder, problem.z.detach(), **kwargs, return_info=True)
        method = info.method
    if method == "cg":
        d, B = problem.spec.d, problem.spec.B
        V = (d**0.5) * torch.eye(d).expand(B, d, d)
        kw = {k: v for k, v in kwargs.items() if k == "batching"}
        check = logdet_grad(problem.decoder, problem.z, method="cg", probes=V, tol=1e-7, **kw)
        gz = torch.autograd.grad(check.sum(), problem.z)[0].double()
        err = rel_error(gz, problem.truth_grads[-1])
        if err > 1e-3:
            raise AssertionError(f"{contender}: full-probe CG gradient off by {err:.2e}")
    elif errors["value_rel_err"] > 1e-4 or errors["grad_rel_err"] > 1e-3:
        raise AssertionError(f"{contender} disagrees with the float64 truth: {errors}")
    return errors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    """The resident high-water mark of this process (VmHWM). Unlike ru_maxrss, which Linux
    carries over from the parent across fork and exec, it belongs to this address space."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("VmHWM not found in /proc/self/status")


def _reset_hwm() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0); harmless where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _memory_child(problem_name: str, contender: str, d: int | None) -> None:
    torch.set_num_threads(int(os.environ.get("RNF_BENCH_THREADS", torch.get_num_threads())))
    problem = make_problem(problem_name, d=d, truth=False)
    tiny = make_problem("quick", truth=False)
    make_step(tiny, contender)()  # load every code path on a tiny problem first
    step = make_step(problem, contender)
    _reset_hwm()
    before = _rss_bytes()
    step()
    print(json.dumps({"peak_bytes": max(_hwm_bytes() - before, 0)}))


def peak_memory(problem_name: str, contender: str, *, d: int | None = None) -> int:
    """Peak resident memory (bytes) one training step adds, in a fresh process.

    The child builds the problem, warms the contender's code paths on a tiny problem, resets its
    resident high-water mark (VmHWM), notes its resident set, runs one step and reports the
    high-water mark above that. glibc's malloc is
    told to serve every block over 128 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), so freed
    tensors leave the resident set at once and the high-water mark is the step's own peak.
    CPU allocations are not tracked by torch, so this is the honest peak there. Linux only.
    """
    cmd = [sys.executable, "-m", "rnf_fast.benchmarks", problem_name, contender]
    if d is not None:
        cmd.append(str(d))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def machine_info() -> dict[str, object]:
    """The machine and software a measurement ran on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .backends import available_backends

    return {
        "cpu": cpu,
        "backends": available_backends(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit,
    }


def _percentile(data: list[float], q: float) -> float:
    xs = sorted(data)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _table(rows: dict[str, tuple[float, list[float], dict]]) -> list[str]:
    rev = rows.get("reverse-mode (vmap(jacrev))", (None,))[0]
    fwd = rows.get("forward-mode (vmap(jacfwd))", (None,))[0]
    lines = [
        "| contender | median ms | p20–p80 ms | speed-up vs reverse-mode "
        "| speed-up vs forward-mode | peak MB | value rel. err | grad rel. err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (median, data, extra) in rows.items():
        p20, p80 = _percentile(data, 0.2) * 1e3, _percentile(data, 0.8) * 1e3
        lines.append(
            f"| {name} | {median * 1e3:.2f} | {p20:.2f}–{p80:.2f} | "
            + (f"{rev / median:.1f}× | " if rev else "– | ")
            + (f"{fwd / median:.2f}× | " if fwd else "– | ")
            + f"{extra.get('peak_bytes', 0) / 2**20:.1f} | "
            f"{extra.get('value_rel_err', float('nan')):.1e} | "
            f"{extra.get('grad_rel_err', float('nan')):.1e} |"
        )
    return lines


def _ops_table(problems: dict[str, dict[str, tuple[float, list[float], dict]]]) -> list[str]:
    """One row per (op, size, dtype) group of backend contenders, with speed-ups over torch."""
    backends = sorted({b for rows in problems.values() for b in rows if b != "torch"})
    lines = [
        "| op, systems, d, dtype | torch ms | "
        + " | ".join(f"{b} ms | {b} speed-up" for b in backends)
        + " |",
        "|---|---:|" + "---:|---:|" * len(backends),
    ]
    for name, rows in problems.items():
        torch_ms = rows["torch"][0] * 1e3 if "torch" in rows else float("nan")
        cells = []
        for b in backends:
            ms = rows[b][0] * 1e3 if b in rows else float("nan")
            cells.append(f"{ms:.2f} | {torch_ms / ms:.2f}×")
        lines.append(f"| {name} | {torch_ms:.2f} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(results: dict) -> str:
    """Turn a pytest-benchmark JSON (from ``bench/``) into Markdown.

    Log-det problems get one table each: time per training step (median, 20th–80th
    percentile), speed-ups (a reference's median over the contender's, higher is faster), the
    peak memory a step adds, and the errors against the float64 truth. Backend comparisons of
    single ops (contenders named after backends) are gathered in one table of speed-ups over
    the torch backend.
    """
    problems: dict[str, dict[str, tuple[float, list[float], dict]]] = {}
    for b in results["benchmarks"]:
        extra = b.get("extra_info", {})
        data = b["stats"].get("data") or [b["stats"]["median"]]
        rows = problems.setdefault(extra.get("problem", "?"), {})
        rows[extra.get("contender", b["name"])] = (b["stats"]["median"], data, extra)
    info = results.get("machine_info", {})
    lines = [
        f"Machine: {info.get('cpu', '?')}, {info.get('threads', '?')} threads, "
        f"GPU: {info.get('gpu') or 'none'}, torch {info.get('torch', '?')}, "
        f"backends {info.get('backends', '?')}; commit {info.get('commit', '?')}.",
    ]
    ops = {k: v for k, v in problems.items() if set(v) <= {"torch", "cpp", "triton"}}
    for name, rows in problems.items():
        if name in ops:
            continue
        spec = PROBLEMS.get(name)
        title = name
        if spec is not None:
            title = f"{name}: MLP d={spec.d} -> {spec.hidden} -> D={spec.D}, tanh, B={spec.B}"
        lines += ["", f"**{title}, float32**", "", *_table(rows)]
    if ops:
        lines += ["", "**Backends of the small ops (and one log-det training step)**", ""]
        lines += _ops_table(ops)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _memory_child(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
