"""Benchmark problems and contenders, shared by ``bench/`` and the ``rnf-fast bench`` command.

A *problem* (:data:`PROBLEMS`, :func:`make_problem`) is a decoder (an MLP, or the decoder of a
rectangular flow), a batch of latents and the float64 dense truth of log det(JᵀJ) and its
gradients. A *contender* turns a problem into a training step (forward, log det term,
backward).

- The suite (:func:`run_suite`, :func:`run_case`): rnf_fast exact/CG/auto and each backend
  against the autodiff Jacobians, the official code's algorithm and the free-form surrogate
  (:func:`suite_contenders`), on every problem of :data:`SUITES` and over d
  (:data:`STUDY_D`); each cell verified (:func:`verify_case`), its time estimated, then
  measured or skipped within its share of the budget; peak memory in a fresh process per
  problem (:func:`suite_peak_memory`); Markdown and plots from the JSON
  (:func:`suite_markdown`, :func:`suite_plots`).
- The pytest-benchmark tables of ``bench/test_logdet_bench.py`` (:data:`CONTENDERS`,
  :func:`verify`, :func:`peak_memory` in a fresh process per case, :func:`report_markdown`).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from . import logdet_grad
from .baselines import (
    logdet_fif,
    logdet_jacfwd,
    logdet_jacrev,
    logdet_official_cg,
)
from .ops.dispatch import available_backends
from .testing import dense_jacobian, grads, mlp_decoder, rel_error

__all__ = [
    "CONTENDERS",
    "PROBLEMS",
    "RNF_CONTENDERS",
    "STUDY_CONTENDERS",
    "STUDY_D",
    "SUITES",
    "SUITE_BUDGET_S",
    "Contender",
    "Problem",
    "ProblemSpec",
    "flow_decoder",
    "machine_info",
    "make_problem",
    "make_step",
    "step_closure",
    "mlp_encoder",
    "peak_memory",
    "problem_encoder",
    "pseudo_inverse_encoder",
    "report_markdown",
    "run_case",
    "run_suite",
    "suite_contenders",
    "suite_markdown",
    "suite_peak_memory",
    "suite_plots",
    "verify",
    "verify_case",
]


@dataclass(frozen=True)
class ProblemSpec:
    """A named problem size.

    ``kind="mlp"``: an MLP decoder d -> hidden -> D with tanh, batch B. ``kind="flow"``: the
    decoder of a :class:`rnf_fast.models.RectangularFlow` built from ``FlowConfig(D, d,
    **flow)``, its zero-initialised last conditioner layers perturbed so that it is not an
    isometry. ``verify_batch`` (flows): the batch on which the answer is checked against the
    float64 dense truth, whose cost grows with B · d forward-mode passes of the whole flow.
    """

    d: int
    D: int
    B: int
    hidden: tuple[int, ...] = ()
    kind: str = "mlp"
    flow: dict = field(default_factory=dict)
    verify_batch: int | None = None
    about: str = ""


_TABULAR_F = {"f_layers": 10, "f_hidden": (128,) * 4, "f_coupling": "affine"}
_MNIST_F = {"image_shape": (1, 28, 28), "image_scales": 2, "image_blocks": 2, "image_channels": 16}

PROBLEMS: dict[str, ProblemSpec] = {
    # The standard problem: the paper's MNIST-sized MLP decoder.
    "mlp-16-784": ProblemSpec(
        d=16, D=784, B=64, hidden=(256, 256), about="MNIST-sized MLP decoder, tanh"
    ),
    "mlp-64-784": ProblemSpec(
        d=64, D=784, B=64, hidden=(256, 256), about="MNIST-sized MLP decoder, larger latent"
    ),
    # Wide decoder where the tangents' graph, not J, dominates memory: the chunking study.
    "mlp-64-784-wide": ProblemSpec(
        d=64, D=784, B=64, hidden=(1024, 1024), about="wide MLP decoder (chunking study)"
    ),
    "flow-miniboone": ProblemSpec(
        d=21,
        D=43,
        B=400,
        kind="flow",
        flow=_TABULAR_F,
        verify_batch=16,
        about="MINIBOONE-sized RealNVP rectangular flow: 10 affine couplings, conditioners [128]*4",
    ),
    "flow-power": ProblemSpec(
        d=2,
        D=6,
        B=5000,
        kind="flow",
        flow=_TABULAR_F,
        verify_batch=64,
        about="POWER-sized RealNVP rectangular flow: 10 affine couplings, conditioners [128]*4",
    ),
    "flow-mnist": ProblemSpec(
        d=20,
        D=784,
        B=50,
        kind="flow",
        flow=_MNIST_F,
        verify_batch=4,
        about="MNIST-sized multi-scale conv RealNVP (1×28×28, 2 scales, 2 blocks, 16 channels)",
    ),
    # Tiny versions for CI: same code paths, run in milliseconds.
    "quick": ProblemSpec(d=3, D=10, B=4, hidden=(8, 8), about="tiny MLP decoder (CI)"),
    "quick-flow": ProblemSpec(
        d=2,
        D=6,
        B=4,
        kind="flow",
        flow={"f_layers": 2, "f_hidden": (8, 8)},
        about="tiny RealNVP rectangular flow (CI)",
    ),
    "quick-image": ProblemSpec(
        d=3,
        D=16,
        B=2,
        kind="flow",
        flow={"image_shape": (1, 4, 4), "image_blocks": 1, "image_channels": 4},
        about="tiny conv RealNVP, 1×4×4 (CI)",
    ),
}


@dataclass
class Problem:
    """A decoder, latents and the float64 dense truth at them.

    Attributes:
        decoder: the float32 decoder (an ``nn.Module`` for MLPs; :func:`flow_decoder` of the
            model for flows).
        z: (B, d) float32 latents, requiring grad.
        params: the parameters the gradient is checked on (those of the decoder).
        truth_value, truth_grads: float64 log det(JᵀJ) (B,) and its gradients with respect to
            ``[*params, z]`` (empty without truth).
        model: the rectangular flow (flows only).
        decoder64, params64, z64, J64: the float64 decoder, its parameters, latents and dense
            Jacobian (B, D, d) the truth came from (empty without truth).
    """

    name: str
    spec: ProblemSpec
    decoder: Callable[[Tensor], Tensor]
    z: Tensor
    truth_value: Tensor
    truth_grads: list[Tensor]
    params: list[Tensor] = field(default_factory=list)
    model: nn.Module | None = None
    decoder64: Callable[[Tensor], Tensor] | None = None
    params64: list[Tensor] = field(default_factory=list)
    z64: Tensor | None = None
    J64: Tensor | None = None


def flow_decoder(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The decoder to hand to :func:`rnf_fast.logdet_grad` for a rectangular flow: its
    ``decoder`` (with an explicit ``linearize``) where the model has one, else ``decode``."""
    decoder = getattr(model, "decoder", None)
    return decoder if decoder is not None else model.decode


def _perturb_zero_parameters(module: nn.Module, *, scale: float, seed: int) -> None:
    """Add scale · N(0, 1) to every all-zero parameter (the zero-initialised last conditioner
    layers, identity LU factors, unset ActNorms): the flow is then neither the identity nor an
    isometry. scale = 0.05 gives cond(J) of about 2-5 on the tabular problems."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and bool((p == 0).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _build_model(spec: ProblemSpec, seed: int) -> nn.Module:
    from .models import FlowConfig, RectangularFlow

    config = FlowConfig(D=spec.D, d=spec.d, h_layers=1, h_hidden=(8,), seed=seed, **spec.flow)
    model = RectangularFlow(config).double().eval()
    _perturb_zero_parameters(model.f, scale=0.05, seed=seed)
    return model


def _truth(decoder: Callable[[Tensor], Tensor], z64: Tensor, params: list[Tensor]):
    J = dense_jacobian(decoder, z64)
    value = torch.linalg.slogdet(J.transpose(1, 2) @ J)[1]
    return value.detach(), grads(value, [*params, z64]), J.detach()


def make_problem(
    name: str,
    *,
    d: int | None = None,
    seed: int = 0,
    truth: bool = True,
    batch: int | None = None,
    device: str = "cpu",
) -> Problem:
    """Build the named problem in float32 with its float64 truth.

    Arguments:
        name: a key of :data:`PROBLEMS`.
        d: another latent dimension (MLP problems; the d-study).
        seed: seeds the weights and the latents.
        truth: compute the float64 dense truth (else its fields are empty).
        batch: another batch size B (the verification batch of the flows).
        device: where the float32 decoder and z live (the truth is computed on the CPU).
    """
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {name!r}")
    spec = PROBLEMS[name]
    if d is not None or batch is not None:
        spec = replace(spec, d=spec.d if d is None else d, B=spec.B if batch is None else batch)
    g = torch.Generator().manual_seed(seed + 1)
    z64 = torch.randn(spec.B, spec.d, generator=g, dtype=torch.float64, requires_grad=True)
    model = None
    if spec.kind == "mlp":
        decoder64 = mlp_decoder(spec.d, spec.D, hidden=spec.hidden, dtype=torch.float64, seed=seed)
        params64 = list(decoder64.parameters())
    elif spec.kind == "flow":
        model = _build_model(spec, seed)
        decoder64 = flow_decoder(model)
        params64 = list(model.f.parameters())
    else:
        raise ValueError(f"spec.kind must be 'mlp' or 'flow', got {spec.kind!r}")
    net64 = model if model is not None else decoder64
    value, truth_grads, J = torch.empty(0), [], None
    if truth:
        value, truth_grads, J = _truth(decoder64, z64, params64)
    net = (copy.deepcopy(net64) if truth else net64).float().to(device)
    decoder = flow_decoder(net) if model is not None else net
    params = list(net.f.parameters()) if model is not None else list(net.parameters())
    z = z64.detach().float().to(device).requires_grad_(True)
    return Problem(
        name,
        spec,
        decoder,
        z,
        value,
        truth_grads,
        params=params,
        model=net if model is not None else None,
        decoder64=decoder64 if truth else None,
        params64=params64 if truth else [],
        z64=z64 if truth else None,
        J64=J,
    )


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
    """A training-step closure of a named contender (see :func:`step_closure`)."""
    return step_closure(problem, CONTENDERS[contender])


def step_closure(
    problem: Problem, fn: Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]
) -> Callable[[], Tensor]:
    """A training-step closure of ``fn(decoder, z) -> (B,) log det term``: zero grads, the
    term, backward; returns the value."""
    params = problem.params

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
        for p in [*problem.params, problem.z]
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
        with warnings.catch_warnings():
            # With float32 products CG loses orthogonality and needs more than d steps when
            # JᵀJ is ill-conditioned (flow-mnist: cond(J) ≈ 30, 39 steps on average to reach
            # 1e-7 at d = 20), so the check lets it run to 10·d; the gradient bound is the test.
            warnings.filterwarnings("ignore", "CG reached max_iter", RuntimeWarning)
            check = logdet_grad(
                problem.decoder, problem.z, method="cg", probes=V, tol=1e-7, max_iter=10 * d, **kw
            )
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


def _git_commit(root: Path) -> str:
    """The checked-out commit (short hash), read from ``.git`` without running git; "unknown"
    outside a checkout."""
    git = root / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:9]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:9]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:9]
    except OSError:
        pass
    return "unknown"


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
    commit = _git_commit(Path(__file__).resolve().parent.parent)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from .ops.cpp import unavailable_reason

    return {
        "cpu": cpu,
        "backends": available_backends(),
        "extension": unavailable_reason() is None,
        "triton_used": "triton" in available_backends(),
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


# ---------------------------------------------------------------------------------------------
# The suite: every contender on every problem, time, memory, matvecs and accuracy in one JSON.
# ---------------------------------------------------------------------------------------------

SUITES: dict[str, list[str]] = {
    "standard": ["mlp-16-784", "mlp-64-784", "flow-miniboone", "flow-power", "flow-mnist"],
    "quick": ["quick", "quick-flow", "quick-image"],
}
"""The problems of each suite size."""

STUDY_D: dict[str, tuple[str, tuple[int, ...]]] = {
    "standard": ("mlp-16-784", (2, 4, 8, 16, 32, 64, 128)),
    "quick": ("quick", (2, 3)),
}
"""The exact-vs-CG study: the base problem (its D, B and hidden widths) and the values of d."""

STUDY_CONTENDERS = (
    "rnf_fast exact",
    "rnf_fast cg K=1",
    "rnf_fast cg K=4",
    "forward-mode (vmap(jacfwd))",
    "official code (CG, K=1)",
)

SUITE_BUDGET_S = {"standard": 900.0, "quick": 0.0}
"""Seconds the suite's cells share (0: quick mode, no timing). The standard suite's 900 s plus
building the problems with their float64 truths and the memory processes (about 3 minutes)
fit 20 minutes on 2 CPU cores; a cell whose estimated cost exceeds its share is skipped with
that estimate."""

MIN_ROUNDS, MAX_ROUNDS = 3, 20
STUDY_SHARE = 0.25  # of the budget, for the d-study


@dataclass(frozen=True)
class Contender:
    """One way of computing the log det term and its gradient.

    Attributes:
        kind: ``"rnf"`` (:func:`rnf_fast.logdet_grad` with ``kwargs``), ``"dense"``
            (autodiff Jacobian + slogdet), ``"official"`` or ``"fif"``.
        fn: (decoder, z, encoder) -> ((B,) term with its gradient attached, stats dict).
        has_value: whether the term's value estimates log det(JᵀJ) (the official and FIF
            baselines return zeros carrying only the gradient).
        kwargs: the keyword arguments of :func:`rnf_fast.logdet_grad` (``kind="rnf"``).
    """

    kind: str
    fn: Callable[..., tuple[Tensor, dict]]
    has_value: bool = True
    kwargs: dict = field(default_factory=dict)


def _rnf_contender(kwargs: dict) -> Contender:
    def fn(decoder, z, encoder):
        with warnings.catch_warnings():
            # Systems that reach max_iter are counted in the stats ("cg_unconverged") instead.
            warnings.filterwarnings("ignore", "CG reached max_iter", RuntimeWarning)
            value, info = logdet_grad(decoder, z, **kwargs, return_info=True)
        iters = info.cg_iterations
        unconverged = None
        if info.converged is not None:
            unconverged = float((~info.converged).float().mean())
        return value, {
            "cg_unconverged": unconverged,
            "method": info.method,
            "backend": info.backend,
            "batching": info.batching,
            "matvecs": info.matvecs,
            "cg_iterations": None if iters is None else float(iters.float().mean()),
        }

    return Contender("rnf", fn, kwargs=kwargs)


def _dense_contender(logdet_fn: Callable[[Callable, Tensor], Tensor]) -> Contender:
    return Contender("dense", lambda decoder, z, encoder: (logdet_fn(decoder, z), {}))


def _official(decoder, z, encoder):
    return logdet_official_cg(decoder, z, probes=1, return_info=True)


def _fif(decoder, z, encoder):
    return logdet_fif(decoder, encoder, z, probes=1), {"matvecs": 0}


def suite_contenders(device: str = "cpu") -> dict[str, Contender]:
    """The suite's contenders for a device: rnf_fast exact, CG with K = 1 and 4, auto, exact
    and CG K = 1 with each non-default available backend forced, the two autodiff Jacobians,
    the official code's algorithm and the free-form injective flow surrogate."""
    backends = available_backends(device)
    out: dict[str, Contender] = {
        "rnf_fast exact": _rnf_contender({"method": "exact"}),
        "rnf_fast cg K=1": _rnf_contender({"method": "cg", "probes": 1}),
        "rnf_fast cg K=4": _rnf_contender({"method": "cg", "probes": 4}),
        "rnf_fast auto": _rnf_contender({"method": "auto"}),
    }
    for b in backends[1:]:  # backends[0] is the default the rows above use
        out[f"rnf_fast exact, {b} backend"] = _rnf_contender({"method": "exact", "backend": b})
        out[f"rnf_fast cg K=1, {b} backend"] = _rnf_contender(
            {"method": "cg", "probes": 1, "backend": b}
        )
    out["forward-mode (vmap(jacfwd))"] = _dense_contender(logdet_jacfwd)
    out["reverse-mode (vmap(jacrev))"] = _dense_contender(logdet_jacrev)
    out["official code (CG, K=1)"] = Contender("official", _official, has_value=False)
    out["free-form surrogate (FIF, K=1)"] = Contender("fif", _fif, has_value=False)
    return out


def _cache_dir() -> Path:
    root = os.environ.get("RNF_BENCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rnf_fast"
    )
    return Path(root)


def mlp_encoder(problem: Problem, *, steps: int = 400, seed: int = 0) -> nn.Module:
    """An MLP encoder D -> reversed(hidden) -> d trained to invert the problem's MLP decoder,
    the FIF surrogate's stand-in for the pseudo-inverse.

    Trained by Adam (lr 1e-3, ``steps`` batches of 256 latents z ~ N(0, I), loss ‖enc(dec(z)) -
    z‖²), seeded, and cached in ``$RNF_BENCH_CACHE`` (default ``~/.cache/rnf_fast``) under a
    key of the problem's sizes and the seeds, so every process of a run uses the same one.

    Arguments:
        problem: an MLP problem (float32 decoder).
        steps, seed: training length and seed.

    Returns:
        The float32 encoder, on the problem's device, parameters not requiring grad.
    """
    spec = problem.spec
    if spec.kind != "mlp":
        raise ValueError(f"problem must be an MLP problem, got kind {spec.kind!r}")
    hidden = tuple(reversed(spec.hidden))
    encoder = mlp_decoder(spec.D, spec.d, hidden=hidden, dtype=torch.float32, seed=seed + 7)
    widths = "-".join(map(str, hidden))
    path = _cache_dir() / f"fif-encoder-{problem.name}-d{spec.d}-h{widths}-{seed}-{steps}.pt"
    device = problem.z.device
    if path.exists():
        encoder.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        g = torch.Generator().manual_seed(seed + 11)
        opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
        decoder = copy.deepcopy(problem.decoder).cpu()
        for _ in range(steps):
            z = torch.randn(256, spec.d, generator=g)
            with torch.no_grad():
                x = decoder(z)
            loss = ((encoder(x) - z) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(encoder.state_dict(), tmp)
        os.replace(tmp, path)
    encoder.requires_grad_(False)
    return encoder.to(device)


def problem_encoder(problem: Problem) -> Callable[[Tensor], Tensor]:
    """The FIF encoder of a problem: the flow's left inverse ``model.encode``, or for an MLP
    decoder the trained :func:`mlp_encoder`."""
    if problem.model is not None:
        return problem.model.encode
    return mlp_encoder(problem)


def pseudo_inverse_encoder(
    decoder: Callable[[Tensor], Tensor], z: Tensor
) -> Callable[[Tensor], Tensor]:
    """An encoder whose Jacobian at x_b = decoder(z)_b is exactly J(z_b)⁺, the pseudo-inverse:
    e(x)_b = z_b + J⁺ (x_b - decoder(z)_b), per sample (rows of x in z's order, each repeated
    K times in a row as :func:`rnf_fast.baselines.logdet_fif` does).

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d) latents.

    Returns:
        A callable mapping (B·K, D) to (B·K, d).
    """
    with torch.no_grad():
        z0 = z.detach()
        x0 = decoder(z0)
        P = torch.linalg.pinv(dense_jacobian(decoder, z0))
    B = z0.shape[0]

    def encoder(x: Tensor) -> Tensor:
        if x.shape[0] % B:
            raise ValueError(f"x must have a multiple of B = {B} rows, got {x.shape[0]}")
        K = x.shape[0] // B
        dx = (x - x0.repeat_interleave(K, 0)).unsqueeze(-1)
        return z0.repeat_interleave(K, 0) + (P.repeat_interleave(K, 0) @ dx).squeeze(-1)

    return encoder


def _suite_step(
    problem: Problem, contender: Contender, encoder: Callable[[Tensor], Tensor] | None
) -> Callable[[], tuple[Tensor, dict]]:
    """A training-step closure: zero grads, the log det term, backward; returns the value and
    the contender's stats."""

    def step() -> tuple[Tensor, dict]:
        for p in problem.params:
            p.grad = None
        problem.z.grad = None
        value, stats = contender.fn(problem.decoder, problem.z, encoder)
        value.sum().backward()
        return value.detach(), stats

    return step


def _flat_grads(problem: Problem) -> Tensor:
    tensors = [*problem.params, problem.z]
    return torch.cat(
        [(torch.zeros_like(t) if t.grad is None else t.grad).double().flatten() for t in tensors]
    ).cpu()


def _flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


VALUE_TOL, GRAD_TOL = 1e-4, 1e-3
"""float32 contenders against the float64 truth: relative error of the value and gradient."""
FLOAT64_TOL = 1e-6
"""The official and FIF algorithms, run in float64 with d scaled unit probes (and CG to
convergence): relative gradient error against the float64 truth."""


def verify_case(
    problem: Problem, name: str, contender: Contender, encoder: Callable | None
) -> dict[str, float | None]:
    """Check a contender on a problem with truth, then report its single-step errors.

    The bounds follow what each method promises. Exact ones (rnf_fast exact, the autodiff
    Jacobians): value within ``VALUE_TOL`` and gradient within ``GRAD_TOL`` (float32).
    rnf_fast CG: with K = d scaled unit probes (√d e_i, E[v vᵀ] = I) and tol 1e-7 (up to 10·d
    iterations) it must reproduce the exact gradient within ``GRAD_TOL``. The official code's
    algorithm and FIF run in float64 with the same probes (CG to tol 1e-12, up to 10·d steps;
    FIF with the exact pseudo-inverse as encoder) and must match within ``FLOAT64_TOL``. The
    stochastic and biased contenders' own single-draw errors are reported, not bounded.

    Returns:
        ``{"value_rel_err": ... or None, "grad_rel_err": ...}`` of one step as timed.

    Raises:
        AssertionError: naming the contender and the error.
    """
    value, stats = _suite_step(problem, contender, encoder)()
    truth = _flat(problem.truth_grads)
    errors: dict[str, float | None] = {
        "value_rel_err": (
            rel_error(value.double().cpu(), problem.truth_value) if contender.has_value else None
        ),
        "grad_rel_err": rel_error(_flat_grads(problem), truth),
    }
    B, d = problem.z.shape
    method = stats.get("method")
    if contender.kind == "dense" or method == "exact":
        if errors["value_rel_err"] > VALUE_TOL or errors["grad_rel_err"] > GRAD_TOL:
            raise AssertionError(f"{name} disagrees with the float64 truth: {errors}")
        return errors
    inputs = [*problem.params, problem.z]
    if method == "cg":
        V = (d**0.5) * torch.eye(d, device=problem.z.device).expand(B, d, d)
        kw = {k: v for k, v in contender.kwargs.items() if k == "backend"}
        with warnings.catch_warnings():
            # With float32 products CG loses orthogonality and needs more than d steps when
            # JᵀJ is ill-conditioned (flow-mnist: cond(J) ≈ 30, 39 steps on average to reach
            # 1e-7 at d = 20), so the check lets it run to 10·d; the gradient bound is the test.
            warnings.filterwarnings("ignore", "CG reached max_iter", RuntimeWarning)
            check = logdet_grad(
                problem.decoder, problem.z, method="cg", probes=V, tol=1e-7, max_iter=10 * d, **kw
            )
        err = rel_error(_flat(grads(check, inputs)), truth)
        bound = GRAD_TOL
    else:
        params64 = problem.params64
        z64 = problem.z64
        V = (d**0.5) * torch.eye(d, dtype=torch.float64).expand(B, d, d)
        if contender.kind == "official":
            # Up to 10·d iterations, as for rnf_fast's check: d are not enough in finite
            # precision when JᵀJ is ill-conditioned (flow-mnist: 7e-5 off after d = 20).
            check = logdet_official_cg(
                problem.decoder64, z64, probes=V, tol=1e-12, min_iter=d, max_iter=10 * d
            )
        else:
            enc = pseudo_inverse_encoder(problem.decoder64, z64)
            check = logdet_fif(problem.decoder64, enc, z64, probes=V)
        err = rel_error(_flat(grads(check, [*params64, z64])), truth)
        bound = FLOAT64_TOL
    if err > bound:
        raise AssertionError(
            f"{name}: with d scaled unit probes its gradient is off the truth by {err:.2e} "
            f"(bound {bound:.0e})"
        )
    return errors


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], tuple[Tensor, dict]], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


def _sub_batch(problem: Problem, b: int) -> Problem:
    return replace(problem, z=problem.z[:b].detach().requires_grad_(True))


def _estimate(
    problem: Problem, contender: Contender, encoder: Callable | None, share_s: float
) -> tuple[float, int]:
    """Estimate the step time at the full batch B from steps at batches 1, 4, 16, … .

    Each size is timed once (the first twice, to leave first-call costs out). From two sizes
    on, the time is extrapolated as affine in the batch, t(b) = t₀ + c·b, through the last two
    (a per-call overhead plus a per-sample cost; never below the last measured time). The
    ramp stops at B, or when the next size (at most 4 times the last time) could take more
    than half of ``share_s``; from a single size the estimate is proportional to B.

    Returns:
        (estimated seconds per step at B, the largest batch measured).
    """
    B = problem.spec.B
    device = problem.z.device
    points: list[tuple[int, float]] = []
    b = 1
    while True:
        b = min(b, B)
        step = _suite_step(_sub_batch(problem, b), contender, encoder)
        if not points:
            step()
        points.append((b, _timed(step, device)))
        if b == B:
            return points[-1][1], B
        t = points[-1][1]
        if len(points) >= 2:
            (b1, t1), (b2, t2) = points[-2:]
            est = t + max((t2 - t1) / (b2 - b1), 0.0) * (B - b)
        else:
            est = t * B / b  # proportional to b until a second size is measured
        # The next size costs at most 4 t: refine while that stays within half the share.
        if 4 * t > share_s / 2:
            return est, b
        b *= 4


def _gpu_peak(problem: Problem, contender: Contender, encoder: Callable | None) -> int:
    step = _suite_step(problem, contender, encoder)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(torch.cuda.max_memory_allocated() - base, 0)


def _suite_memory_child(problem_name: str, d: int | None, contenders: list[str]) -> None:
    torch.set_num_threads(int(os.environ.get("RNF_BENCH_THREADS", torch.get_num_threads())))
    tiny = make_problem(problem_name, d=d, truth=False, batch=1)
    problem = make_problem(problem_name, d=d, truth=False)
    encoders: dict[str, Callable | None] = {"tiny": None, "full": None}
    for name in contenders:
        contender = suite_contenders("cpu")[name]
        if contender.kind == "fif" and encoders["full"] is None:
            encoders = {"tiny": problem_encoder(tiny), "full": problem_encoder(problem)}
        enc = encoders["full"] if contender.kind == "fif" else None
        # Load every code path on one sample first.
        _suite_step(tiny, contender, encoders["tiny"] if enc is not None else None)()
        step = _suite_step(problem, contender, enc)
        _reset_hwm()
        before = _rss_bytes()
        step()
        peak = max(_hwm_bytes() - before, 0)
        print(json.dumps({"contender": name, "peak_bytes": peak}), flush=True)


def suite_peak_memory(
    problem_name: str, contenders: list[str], *, d: int | None = None
) -> dict[str, int]:
    """Peak resident memory (bytes) one training step of each contender adds, on the CPU.

    One fresh process per problem measures the contenders in turn: for each, a step on one
    sample loads its code paths, then the resident high-water mark (VmHWM) is reset, the
    resident set noted, one full step run, and the mark above that reported. glibc's malloc
    serves every block over 128 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``), so what a step frees
    leaves the resident set at once and earlier contenders do not hide a later one's peak. (A
    process per cell would cost its ~5 s of imports per cell.) Contenders measured before a
    crash of the process (e.g. out of memory) keep their numbers; the others are missing.

    Arguments:
        problem_name: a key of :data:`PROBLEMS`.
        contenders: names from :func:`suite_contenders`.
        d: another latent dimension (the d-study).

    Returns:
        Contender name to peak bytes.
    """
    cmd = [sys.executable, "-m", "rnf_fast.benchmarks", "--suite", problem_name]
    cmd += [str(d) if d is not None else "-", *contenders]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    peaks = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            peaks[row["contender"]] = int(row["peak_bytes"])
    return peaks


def _cached_problems(cache: dict, problem_name: str, d: int | None, device: str) -> dict:
    """The timing problem (full batch, no truth) and the truth problem (verification batch)
    of a cell, built once per (problem, d, device) in ``cache``."""
    key = (problem_name, d, device)
    if key not in cache:
        spec = PROBLEMS[problem_name]
        cache[key] = {
            "timing": make_problem(problem_name, d=d, truth=False, device=device),
            "truth": make_problem(problem_name, d=d, batch=spec.verify_batch, device=device),
        }
    return cache[key]


def run_case(
    problem_name: str,
    contender_name: str,
    *,
    share_s: float | None,
    d: int | None = None,
    device: str = "cpu",
    memory: bool = True,
    cache: dict | None = None,
) -> dict:
    """Verify, measure and time one (problem, contender) cell.

    With ``share_s=None`` (quick mode) the contender is verified and run once at full size,
    with no estimate and one timed step (peak memory only if ``memory``). Otherwise: estimate
    the step time (:func:`_estimate`); skip the cell, recording the estimate, if
    ``MIN_ROUNDS`` + 2 steps would exceed ``share_s``; else verify on the truth batch, measure
    peak memory (a fresh process on the CPU, ``max_memory_allocated`` on CUDA), and time as
    many rounds as the share allows (``MIN_ROUNDS`` to ``MAX_ROUNDS``).

    Arguments:
        problem_name, contender_name: keys of :data:`PROBLEMS` and :func:`suite_contenders`.
        share_s: seconds this cell may take (None: quick mode; 0 skips after the estimate).
        d: another latent dimension (the d-study).
        device: ``"cpu"`` or ``"cuda"``.
        memory: measure peak memory (on the CPU a fresh process for this cell alone;
            :func:`run_suite` measures all the cells of a problem in one process instead).
        cache: a dict reused across calls to keep built problems and encoders.

    Returns:
        A row of the suite JSON.
    """
    contender = suite_contenders(device)[contender_name]
    problems = _cached_problems({} if cache is None else cache, problem_name, d, device)
    timing, truth = problems["timing"], problems["truth"]
    if contender.kind == "fif":
        for which in ("timing", "truth"):
            if which + "_encoder" not in problems:
                problems[which + "_encoder"] = problem_encoder(problems[which])
    enc_t, enc_v = problems.get("timing_encoder"), problems.get("truth_encoder")
    spec = timing.spec
    row: dict = {
        "problem": problem_name,
        "contender": contender_name,
        "kind": contender.kind,
        "d": spec.d,
        "D": spec.D,
        "B": spec.B,
        "status": "ok",
    }
    started = time.perf_counter()
    dev = timing.z.device
    if share_s is not None:
        est, from_b = _estimate(timing, contender, enc_t, share_s)
        row.update(estimate_s=est, estimate_from_batch=from_b)
        if est * (MIN_ROUNDS + 2) > share_s:
            row["status"] = "skipped"
            return row
    row.update(verify_case(truth, contender_name, contender, enc_v), verify_batch=truth.spec.B)
    step = _suite_step(timing, contender, enc_t)
    first = _timed(step, dev)
    _, stats = step()
    row.update({k: v for k, v in stats.items()})
    if memory:
        if dev.type == "cuda":
            row["peak_bytes"] = _gpu_peak(timing, contender, enc_t)
        else:
            peaks = suite_peak_memory(problem_name, [contender_name], d=d)
            if contender_name in peaks:
                row["peak_bytes"] = peaks[contender_name]
    if share_s is None:
        row["times_s"] = [first]
    else:
        left = share_s - (time.perf_counter() - started)
        rounds = int(min(max(left / max(first, 1e-9), MIN_ROUNDS), MAX_ROUNDS))
        row["times_s"] = [_timed(step, dev) for _ in range(rounds)]
    times = row["times_s"]
    row.update(
        median_s=_percentile(times, 0.5),
        p20_s=_percentile(times, 0.2),
        p80_s=_percentile(times, 0.8),
        rounds=len(times),
    )
    return row


def _crossover(rows: list[dict], fast: str, slow: str) -> int | None:
    """The smallest d from which ``fast`` has the lower median step time than ``slow``."""
    times = {(r["contender"], r["d"]): r.get("median_s") for r in rows if r["status"] == "ok"}
    ds = sorted({r["d"] for r in rows})
    for d in ds:
        a, b = times.get((fast, d)), times.get((slow, d))
        if a is not None and b is not None and a < b:
            return d
    return None


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; keep the suite usable without it
        return None
    return tqdm(total=total, disable=not enabled, unit="cell", dynamic_ncols=True)


def run_suite(
    size: str = "standard",
    *,
    device: str = "cpu",
    budget_s: float | None = None,
    progress: bool = True,
    problems: list[str] | None = None,
    study: bool = True,
) -> dict:
    """Run the benchmark suite and return its JSON-ready results.

    Every (problem, contender) cell of ``SUITES[size]`` and the exact-vs-CG study over d
    (``STUDY_D[size]``) runs through :func:`run_case`. The budget (``SUITE_BUDGET_S[size]`` by
    default) is split: ``STUDY_SHARE`` to the study, the rest evenly over the problems and then
    over the cells, each cell's share being what is left of its pool over the cells left
    (so time a fast cell does not use goes to the later ones); quick mode (budget 0) verifies
    every cell and runs it once.

    Arguments:
        size: ``"standard"`` or ``"quick"``.
        device: ``"cpu"`` or ``"cuda"``.
        budget_s: override the measurement budget in seconds.
        progress: show a progress bar on stderr.
        problems: run only these problems (default: the suite's).
        study: include the d-study.

    Returns:
        ``{"suite", "size", "device", "budget_s", "elapsed_s", "machine_info", "rows",
        "study_d"}``.
    """
    if size not in SUITES:
        raise ValueError(f"size must be one of {sorted(SUITES)}, got {size!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    budget = SUITE_BUDGET_S[size] if budget_s is None else float(budget_s)
    names = list(suite_contenders(device))
    problem_names = SUITES[size] if problems is None else problems
    base, ds = STUDY_D[size]
    total = len(problem_names) * len(names) + (len(ds) * len(STUDY_CONTENDERS) if study else 0)
    bar = _progress(total, progress)
    started = time.perf_counter()
    measure = budget > 0
    in_process = measure and device == "cuda"  # else one process per problem, after its cells
    main_budget = budget * (1 - STUDY_SHARE) if study else budget
    rows: list[dict] = []
    study_rows: list[dict] = []
    # Seconds left in each pool and cells left to share them: what a fast cell leaves unused
    # goes to the cells after it.
    pools = {"main": [main_budget, len(problem_names) * len(names)]}
    jobs = [(pname, None, names, "main", rows) for pname in problem_names]
    if study:
        pools["study"] = [budget * STUDY_SHARE, len(ds) * len(STUDY_CONTENDERS)]
        jobs += [(base, d, list(STUDY_CONTENDERS), "study", study_rows) for d in ds]
    for pname, d, cnames, pool, out in jobs:
        cache: dict = {}
        # Building the problem and its float64 truth is set-up, outside the cells' budget.
        _cached_problems(cache, pname, d, device)
        done = []
        for cname in cnames:
            if bar is not None:
                where = pname if d is None else f"d-study d={d}"
                bar.set_description(f"{where} | {cname}")
            left, cells = pools[pool]
            # An exhausted pool still gives each cell its estimate (then a skip).
            share = max(left, 0.0) / cells if budget > 0 else None
            t0 = time.perf_counter()
            done.append(
                run_case(
                    pname,
                    cname,
                    share_s=share,
                    d=d,
                    device=device,
                    memory=in_process,
                    cache=cache,
                )
            )
            pools[pool] = [left - (time.perf_counter() - t0), cells - 1]
            if bar is not None:
                bar.update()
        if measure and not in_process:
            ok = [r["contender"] for r in done if r["status"] == "ok"]
            peaks = suite_peak_memory(pname, ok, d=d) if ok else {}
            for r in done:
                if r["contender"] in peaks:
                    r["peak_bytes"] = peaks[r["contender"]]
        out.extend(done)
    if bar is not None:
        bar.close()
    return {
        "suite": "rnf_fast",
        "size": size,
        "device": device,
        "budget_s": budget,
        "elapsed_s": time.perf_counter() - started,
        "machine_info": machine_info(),
        "rows": rows,
        "study_d": {
            "problem": base,
            "ds": list(ds),
            "rows": study_rows,
            "crossover": {
                "cg K=1 faster than exact from d": _crossover(
                    study_rows, "rnf_fast cg K=1", "rnf_fast exact"
                ),
                "cg K=4 faster than exact from d": _crossover(
                    study_rows, "rnf_fast cg K=4", "rnf_fast exact"
                ),
            },
        },
    }


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _bound(row: dict) -> str:
    """ "≤ " for an estimate scaled from one sample: with a step time affine in the batch,
    t(B) = a + c·B ≤ B·t(1), it is an upper bound; "" for the two-size affine fit."""
    return "≤ " if row.get("estimate_from_batch") == 1 and row["B"] > 1 else ""


def _suite_table(rows: list[dict]) -> list[str]:
    ok = {r["contender"]: r for r in rows if r["status"] == "ok"}
    rev = ok.get("reverse-mode (vmap(jacrev))", {}).get("median_s")
    fwd = ok.get("forward-mode (vmap(jacfwd))", {}).get("median_s")
    # A skipped reference still gives a ratio, from its estimate, marked "~".
    est = {r["contender"]: r.get("estimate_s") for r in rows if r["status"] == "skipped"}
    rev_mark, fwd_mark = "", ""
    if rev is None and est.get("reverse-mode (vmap(jacrev))"):
        rev, rev_mark = est["reverse-mode (vmap(jacrev))"], "~"
    if fwd is None and est.get("forward-mode (vmap(jacfwd))"):
        fwd, fwd_mark = est["forward-mode (vmap(jacfwd))"], "~"
    lines = [
        "| contender | method, backend | median ms | p20–p80 ms | vs reverse-mode "
        "| vs forward-mode | peak MB | matvecs | CG iters | value rel. err | grad rel. err |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["contender"]
        how = ", ".join(str(r[k]) for k in ("method", "backend") if r.get(k))
        if r["status"] == "skipped":
            est = (
                f"skipped: est. {_bound(r)}{r['estimate_s'] * 1e3:.0f} ms/step "
                f"(from B={r['estimate_from_batch']})"
            )
            lines.append(f"| {name} | {how or '–'} | {est} | | | | | | | | |")
            continue
        med = r["median_s"]
        lines.append(
            f"| {name} | {how or '–'} | {med * 1e3:.2f} | "
            f"{r['p20_s'] * 1e3:.2f}–{r['p80_s'] * 1e3:.2f} | "
            + (f"{rev_mark}{rev / med:.1f}× | " if rev else "– | ")
            + (f"{fwd_mark}{fwd / med:.2f}× | " if fwd else "– | ")
            + (f"{r['peak_bytes'] / 2**20:.1f} | " if "peak_bytes" in r else "– | ")
            + f"{_fmt(r.get('matvecs'), 'd')} | {_fmt(r.get('cg_iterations'), '.1f')} | "
            f"{_fmt(r.get('value_rel_err'), '.1e')} | {_fmt(r.get('grad_rel_err'), '.1e')} |"
        )
    return lines


def _study_table(study: dict) -> list[str]:
    rows = study["rows"]
    names = list(dict.fromkeys(r["contender"] for r in rows))
    cell = {(r["contender"], r["d"]): r for r in rows}
    lines = [
        "| d | " + " | ".join(f"{n} ms (MB)" for n in names) + " |",
        "|---:|" + "---:|" * len(names),
    ]
    for d in study["ds"]:
        cells = []
        for n in names:
            r = cell.get((n, d))
            if r is None:
                cells.append("–")
            elif r["status"] == "skipped":
                cells.append(f"skipped (est. {_bound(r)}{r['estimate_s'] * 1e3:.0f})")
            else:
                mb = f" ({r['peak_bytes'] / 2**20:.1f})" if "peak_bytes" in r else ""
                cells.append(f"{r['median_s'] * 1e3:.2f}{mb}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return lines


def suite_markdown(results: dict) -> str:
    """Markdown of a :func:`run_suite` JSON: one table per problem (time per training step with
    its 20th–80th percentiles, speed-ups over the autodiff Jacobians (marked ~ when that
    reference was skipped and its estimate is used), peak memory, matvecs and
    CG iterations, errors against the float64 truth; skipped cells with their estimated time),
    then the exact-vs-CG study over d with its crossovers."""
    info = results.get("machine_info", {})
    lines = [
        f"Machine: {info.get('cpu', '?')}, {info.get('threads', '?')} threads, "
        f"GPU: {info.get('gpu') or 'none'}, torch {info.get('torch', '?')}, "
        f"triton {info.get('triton') or 'none'}, extension "
        f"{'built' if info.get('extension') else 'absent'}, backends "
        f"{info.get('backends', '?')}; commit {info.get('commit', '?')}. Suite "
        f"{results.get('size')} on {results.get('device')}, "
        f"{results.get('elapsed_s', 0):.0f} s.",
    ]
    if results.get("size") == "quick":
        lines.append("Quick mode: each cell verified and run once; times are single steps.")
    by_problem: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_problem.setdefault(r["problem"], []).append(r)
    for pname, rows in by_problem.items():
        spec = PROBLEMS[pname]
        lines += [
            "",
            f"**{pname}: {spec.about}; d={spec.d}, D={spec.D}, B={spec.B}, float32**",
            "",
            *_suite_table(rows),
        ]
    study = results.get("study_d")
    if study and study["rows"]:
        spec = PROBLEMS[study["problem"]]
        cross = ", ".join(
            f"{k}: {v if v is not None else 'none'}" for k, v in study["crossover"].items()
        )
        lines += [
            "",
            f"**Exact vs CG as d grows: MLP d -> {spec.hidden} -> D={spec.D}, B={spec.B}; "
            f"time per step, ms (peak MB)**",
            "",
            *_study_table(study),
            "",
            f"Crossover: {cross}.",
        ]
    return "\n".join(lines) + "\n"


def suite_plots(results: dict, out_dir: str | os.PathLike, *, prefix: str = "bench") -> list[Path]:
    """Plots of a :func:`run_suite` JSON (matplotlib, log scales), written to ``out_dir``:
    ``{prefix}_time.png`` and ``{prefix}_memory.png`` (one panel per problem, a dot per
    contender, skipped cells as open red dots at their estimated time) and
    ``{prefix}_d_time.png``, ``{prefix}_d_memory.png`` (one line per contender against d, the
    CG/exact crossovers marked). A figure with no data (memory in quick mode) is not written.

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    by_problem: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_problem.setdefault(r["problem"], []).append(r)
    for key, label, scale in (
        ("median_s", "time per step (ms)", 1e3),
        ("peak_bytes", "peak memory (MB)", 2**-20),
    ):
        if not any(r.get(key) for r in results["rows"]):
            continue  # quick mode measures no memory
        fig, axes = plt.subplots(
            len(by_problem), 1, figsize=(8, 2.2 + 0.3 * 12 * len(by_problem) / 2), squeeze=False
        )
        for ax, (pname, rows) in zip(axes[:, 0], by_problem.items()):
            names = [r["contender"] for r in rows]
            vals = [r[key] * scale if r.get(key) else float("nan") for r in rows]
            est = [
                r["estimate_s"] * 1e3
                if key == "median_s" and r["status"] == "skipped"
                else float("nan")
                for r in rows
            ]
            ys = range(len(names))
            ax.scatter(vals, list(ys), color="tab:blue", zorder=3, label="measured")
            if any(e == e for e in est):  # not all NaN
                ax.scatter(
                    est,
                    list(ys),
                    facecolors="none",
                    edgecolors="tab:red",
                    zorder=3,
                    label="skipped: estimate",
                )
            ax.grid(axis="x", which="both", alpha=0.3)
            ax.set_yticks(list(ys), names, fontsize=7)
            ax.invert_yaxis()
            if not any(v == v for v in vals + est):  # every cell skipped or unmeasured
                ax.text(0.5, 0.5, "no measurement", transform=ax.transAxes, ha="center")
            else:
                ax.legend(fontsize=7, loc="lower right")
                ax.set_xscale("log")
            ax.set_title(pname, fontsize=9)
            ax.set_xlabel(label, fontsize=8)
        fig.tight_layout()
        path = out / f"{prefix}_{'time' if key == 'median_s' else 'memory'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    study = results.get("study_d")
    if study and study["rows"]:
        for key, label, scale, suffix in (
            ("median_s", "time per step (ms)", 1e3, "time"),
            ("peak_bytes", "peak memory (MB)", 2**-20, "memory"),
        ):
            fig, ax = plt.subplots(figsize=(6, 4))
            names = list(dict.fromkeys(r["contender"] for r in study["rows"]))
            for n in names:
                pts = sorted(
                    (r["d"], r[key] * scale)
                    for r in study["rows"]
                    if r["contender"] == n and r["status"] == "ok" and r.get(key)
                )
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=n)
            if not ax.lines:
                plt.close(fig)
                continue
            for (what, d), style in zip(study["crossover"].items(), ("--", ":")):
                if d is not None:
                    ax.axvline(
                        d,
                        color="gray",
                        linestyle=style,
                        label=what.replace(" from d", f" from d={d}"),
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("latent dimension d")
            ax.set_ylabel(label)
            spec = PROBLEMS[study["problem"]]
            ax.set_title(f"MLP decoder d -> {spec.hidden} -> {spec.D}, B={spec.B}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / f"{prefix}_d_{suffix}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


if __name__ == "__main__":
    if sys.argv[1] == "--suite":
        _suite_memory_child(
            sys.argv[2], None if sys.argv[3] == "-" else int(sys.argv[3]), sys.argv[4:]
        )
    else:
        _memory_child(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
