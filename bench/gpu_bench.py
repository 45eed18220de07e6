"""GPU benchmark of the Triton kernels and of ``rnf_fast.logdet_grad`` (bench/gpu.sh runs it).

On a CUDA device: measures the chip's ceilings (device-to-device copy bandwidth, float32 matmul
throughput), then times each kernel against its PyTorch reference and reports the achieved
bandwidth and FLOP/s as fractions of those ceilings; then times a full training step of the log
det term on the standard problem ("mlp-16-784") for rnf_fast (exact and cg, default backend and
the plain "torch" backend) against ``vmap(jacfwd)`` and ``vmap(jacrev)``, with peak memory.
Every answer is verified before it is timed (kernels: the closeness rule against a float64
truth; log det: the float64 dense truth). Prints a table last and writes JSON.

Without CUDA (``--device cpu``, the default there) the same script runs on the CPU with tiny
sizes: the kernel entries are the PyTorch references and backends the CPU ones, and every
record says ``"device": "cpu"``. It checks the script, not the chip.

    python bench/gpu_bench.py                      # CUDA if present, else CPU mode
    python bench/gpu_bench.py --out bench/results/gpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rnf_fast.kernels import reference as kernel_reference
from torch import Tensor

import rnf_fast
from rnf_fast import benchmarks, kernels, reference
from rnf_fast.backends import get_backend
from rnf_fast.baselines import logdet_jacfwd, logdet_jacrev
from rnf_fast.testing import rel_error

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode."""

    copy_bytes: int  # ceiling: bytes of the copied tensor
    matmul_n: int  # ceiling: n of the n × n × n float32 matmul
    B: int
    K: int
    hidden: int
    D: int
    d: int
    m: int  # coupling: transformed features
    problem: str  # the logdet_grad problem
    budget_s: float  # time spent timing one case, at most


CUDA_SIZES = Sizes(2**30, 8192, 64, 16, 256, 784, 16, 392, "mlp-16-784", 1.0)
CPU_SIZES = Sizes(2**24, 512, 8, 4, 32, 64, 4, 24, "quick", 0.2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median seconds per call of ``fn`` (after warm-up), repeating within ``budget_s``."""
    for _ in range(3):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(200, max(5, budget_s / once)))
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def _time_copy(device: torch.device, sizes: Sizes) -> float:
    src = torch.empty(sizes.copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return time_call(lambda: dst.copy_(src), device, sizes.budget_s)


def ceilings(device: torch.device, sizes: Sizes) -> dict[str, float]:
    """Measured ceilings: copy bandwidth (GB/s, read + write) and float32 matmul TFLOP/s (no
    TF32: the kernels accumulate in IEEE float32, so this is the ceiling they compete with)."""
    t_copy = _time_copy(device, sizes)
    n = sizes.matmul_n
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        t_mm = time_call(lambda: a @ b, device, sizes.budget_s)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return {"copy_GBps": 2 * sizes.copy_bytes / t_copy / 1e9, "fp32_TFLOPs": 2 * n**3 / t_mm / 1e12}


def check_close(name: str, got: Tensor, torch_run: Tensor, truth: Tensor) -> float:
    """The closeness rule: error against the float64 truth at most twice PyTorch's (never
    below the unit roundoff). Raises on failure; returns the kernel's relative error."""
    err = rel_error(got.double(), truth.double())
    err_torch = rel_error(torch_run.double(), truth.double())
    if err > max(2 * err_torch, torch.finfo(got.dtype).eps / 2):
        raise AssertionError(f"{name}: error {err:.2e} > 2 x PyTorch's {err_torch:.2e}")
    return err


def _as_tuple(out: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _case(name, impl, ours, ref, *, flops, bytes_, device, sizes, ceil, err):
    t_ours = time_call(ours, device, sizes.budget_s)
    t_ref = time_call(ref, device, sizes.budget_s)
    row = {
        "case": name,
        "impl": impl,
        "ms": t_ours * 1e3,
        "ref_ms": t_ref * 1e3,
        "speedup": t_ref / t_ours,
        "GBps": bytes_ / t_ours / 1e9,
        "bw_frac": bytes_ / t_ours / 1e9 / ceil["copy_GBps"],
        "rel_err": err,
    }
    if flops:
        row |= {
            "TFLOPs": flops / t_ours / 1e12,
            "flop_frac": flops / t_ours / 1e12 / ceil["fp32_TFLOPs"],
        }
    return row


def kernel_cases(device: torch.device, sizes: Sizes, ceil: dict[str, float]) -> list[dict]:
    """Each kernel against its PyTorch reference, verified then timed."""
    B, K, h, D, d, m = sizes.B, sizes.K, sizes.hidden, sizes.D, sizes.d, sizes.m
    impl = "triton" if device.type == "cuda" and kernels.triton_available() else "torch reference"
    rows = []
    f32 = {"device": device, "dtype": torch.float32}
    M = B * K
    for transpose, (n_in, n_out) in ((False, (h, h)), (True, (h, h)), (False, (h, D))):
        X = torch.randn(B, K, n_out if transpose else n_in, **f32)
        W = torch.randn(n_out, n_in, **f32) / n_in**0.5
        S = torch.rand(B, n_out, **f32)
        got = kernels.scaled_linear(X, W, S, transpose=transpose)
        ref = kernel_reference.scaled_linear(X, W, S, transpose=transpose)
        truth = kernel_reference.scaled_linear(
            X.double(), W.double(), S.double(), transpose=transpose
        )
        err = check_close("scaled_linear", got, ref, truth)
        rows.append(
            _case(
                f"scaled_linear {'cotangent' if transpose else 'tangent'} {M}x{n_in}x{n_out}",
                impl,
                lambda X=X, W=W, S=S, t=transpose: kernels.scaled_linear(X, W, S, transpose=t),
                lambda X=X, W=W, S=S, t=transpose: kernel_reference.scaled_linear(
                    X, W, S, transpose=t
                ),
                flops=2 * M * n_in * n_out,
                bytes_=4 * (M * (n_in + n_out) + n_in * n_out + B * n_out),
                device=device,
                sizes=sizes,
                ceil=ceil,
                err=err,
            )
        )
    for P in (2, 23):
        dy_dx, dy_dtheta = torch.rand(B, m, **f32), torch.randn(B, m, P, **f32)
        dx_t, dtheta = torch.randn(B, K, m, **f32), torch.randn(B, K, m, P, **f32)
        # The two directions of the coupling step, one row each (same bytes moved).
        for op, args in (
            ("coupling_tangent", (dx_t, dtheta, dy_dx, dy_dtheta)),
            ("coupling_cotangent", (dx_t, dy_dx, dy_dtheta)),
        ):
            kernel, ref = getattr(kernels, op), getattr(kernel_reference, op)
            runs = ((kernel, args), (ref, args), (ref, tuple(x.double() for x in args)))
            outs = [_as_tuple(f(*a)) for f, a in runs]
            err = max(check_close(op, g, r, t) for g, r, t in zip(*outs))
            rows.append(
                _case(
                    f"{op} P={P} {M}x{m}",
                    impl,
                    lambda a=args, f=kernel: f(*a),
                    lambda a=args, f=ref: f(*a),
                    flops=0,
                    bytes_=4 * (2 * M * m + M * m * P + B * m * (P + 1)),
                    device=device,
                    sizes=sizes,
                    ceil=ceil,
                    err=err,
                )
            )
    name, ops = get_backend(None, device)
    for dtype in (torch.float32, torch.float64):
        JT = torch.randn(B, d, D, device=device, dtype=dtype)
        J = JT.transpose(1, 2)
        esize = JT.element_size()
        got, ref = ops.gram(J), reference.gram(J)
        err = (
            check_close("gram", got, ref, reference.gram(J.double()))
            if dtype == torch.float32
            else rel_error(got, ref)
        )
        row = _case(
            f"gram {str(dtype)[6:]} B={B} D={D} d={d}",
            f"{name} backend",
            lambda J=J: ops.gram(J),
            lambda J=J: reference.gram(J),
            flops=2 * B * D * d * d,
            bytes_=esize * (B * D * d + B * d * d),
            device=device,
            sizes=sizes,
            ceil=ceil,
            err=err,
        )
        rows.append(row)
        rows.append(_cg_case(ops, name, dtype, device, sizes, ceil))
    return rows


def _spd(N: int, d: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    G = torch.randn(N, d, d, dtype=torch.float64, device=device)
    A = G @ G.transpose(1, 2) / d + 0.5 * torch.eye(d, dtype=torch.float64, device=device)
    return A.to(dtype), torch.randn(N, d, dtype=dtype, device=device)


def _cg_case(ops, name, dtype, device, sizes, ceil) -> dict:
    """One fused CG step for N = B·K systems of size d: the backend's against the reference."""
    N, d = sizes.B * sizes.K, sizes.d
    A, b = _spd(N, d, dtype, device)
    # Verify: a full solve with the backend's update reaches the same steps and solution.
    solved = {}
    for label, update in ((name, ops.cg_update), ("torch", reference.cg_update)):
        state = reference.cg_init(b, d)
        for _ in range(d):
            update(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), 1e-6)
        solved[label] = state
    x_true = torch.linalg.solve(A.double(), b.double())
    if not torch.equal(solved[name].steps, solved["torch"].steps):
        raise AssertionError(f"cg_update ({name}): step counts differ from the reference")
    err = check_close("cg_update", solved[name].x, solved["torch"].x, x_true)
    base = reference.cg_init(b, 1)
    Ap = (A @ base.p.unsqueeze(-1)).squeeze(-1)

    def fresh(update):
        # A step's cost does not depend on the values: the state is reused, its iteration
        # counter rewound, tol = 0 keeps the systems active.
        state = reference.CGState(
            **{k: (v.clone() if isinstance(v, Tensor) else v) for k, v in base.__dict__.items()}
        )

        def run():
            state.it = 0
            update(state, Ap, 0.0)

        return run

    esize = torch.empty((), dtype=dtype).element_size()
    row = _case(
        f"cg_update {str(dtype)[6:]} N={N} d={d}",
        f"{name} backend",
        fresh(ops.cg_update),
        fresh(reference.cg_update),
        flops=0,
        bytes_=esize * N * d * 9,  # p, Ap read twice, x, r read and written, p rewritten
        device=device,
        sizes=sizes,
        ceil=ceil,
        err=err,
    )
    return row


def _move(problem: benchmarks.Problem, device: torch.device) -> benchmarks.Problem:
    problem.decoder.to(device)
    problem.z = problem.z.detach().to(device).requires_grad_(True)
    problem.truth_value = problem.truth_value.to(device)
    problem.truth_grads = [g.to(device) for g in problem.truth_grads]
    return problem


def logdet_cases(device: torch.device, sizes: Sizes) -> list[dict]:
    """A training step of the log det term: rnf_fast against the autodiff baselines."""
    problem = _move(benchmarks.make_problem(sizes.problem), device)
    B, d = problem.spec.B, problem.spec.d
    auto = get_backend(None, device)[0]
    contenders: dict[str, tuple[Callable, str]] = {
        f"rnf_fast exact ({auto})": (
            lambda dec, z: rnf_fast.logdet_grad(dec, z, method="exact"),
            "exact",
        ),
        "rnf_fast exact (torch)": (
            lambda dec, z: rnf_fast.logdet_grad(dec, z, method="exact", backend="torch"),
            "exact",
        ),
        f"rnf_fast cg K=1 ({auto})": (
            lambda dec, z: rnf_fast.logdet_grad(dec, z, method="cg"),
            "cg",
        ),
        "rnf_fast cg K=1 (torch)": (
            lambda dec, z: rnf_fast.logdet_grad(dec, z, method="cg", backend="torch"),
            "cg",
        ),
        "vmap(jacfwd)": (logdet_jacfwd, "exact"),
        "vmap(jacrev)": (logdet_jacrev, "exact"),
    }
    params = list(problem.decoder.parameters())
    rows = []
    for label, (fn, kind) in contenders.items():
        step = benchmarks.step_closure(problem, fn)
        value = step()
        got = torch.cat(
            [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]
            + [problem.z.grad.flatten()]
        ).double()
        want = torch.cat([g.flatten() for g in problem.truth_grads])
        v_err, g_err = rel_error(value.double(), problem.truth_value), rel_error(got, want)
        if kind == "cg":
            # Its own single-probe noise is reported; the math is checked with full probes.
            V = (d**0.5) * torch.eye(d, device=device).expand(B, d, d)
            backend = "torch" if label.endswith("(torch)") else None
            check = rnf_fast.logdet_grad(
                problem.decoder,
                problem.z,
                method="cg",
                probes=V,
                tol=1e-7,
                max_iter=3 * d,
                backend=backend,
            )
            gz = torch.autograd.grad(check.sum(), problem.z)[0].double()
            if rel_error(gz, problem.truth_grads[-1]) > 1e-3:
                raise AssertionError(f"{label}: full-probe CG gradient disagrees with the truth")
        elif v_err > 1e-4 or g_err > 1e-3:
            raise AssertionError(
                f"{label} disagrees with the float64 truth: {v_err:.2e}, {g_err:.2e}"
            )
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            _sync(device)
            peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak_mb = None
        seconds = time_call(step, device, sizes.budget_s)
        rows.append(
            {
                "case": f"logdet_grad {problem.name}",
                "impl": label,
                "ms": seconds * 1e3,
                "peak_MiB": peak_mb,
                "value_rel_err": v_err,
                "grad_rel_err": g_err,
            }
        )
    slowest = {r["impl"]: r["ms"] for r in rows}
    for r in rows:
        r["speedup_vs_jacrev"] = slowest["vmap(jacrev)"] / r["ms"]
        r["speedup_vs_jacfwd"] = slowest["vmap(jacfwd)"] / r["ms"]
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``columns`` over ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default by mode)")
    args = parser.parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    device = torch.device("cuda" if use_cuda else "cpu")
    sizes = CUDA_SIZES if use_cuda else CPU_SIZES
    out = args.out or RESULTS / ("gpu.json" if use_cuda else "gpu_cpu_mode.json")
    torch.manual_seed(0)
    start = time.perf_counter()
    ceil = ceilings(device, sizes)
    krows = kernel_cases(device, sizes, ceil)
    lrows = logdet_cases(device, sizes)
    result = {
        "mode": "cuda" if use_cuda else "cpu (tiny sizes: checks the script, not a GPU)",
        "device": device.type,
        "machine": benchmarks.machine_info(),
        "sizes": sizes.__dict__,
        "ceilings": ceil,
        "kernels": krows,
        "logdet_grad": lrows,
        "seconds": time.perf_counter() - start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    label = "CUDA" if use_cuda else "CPU MODE (tiny sizes; not GPU numbers)"
    print(f"\n## {label}: {result['machine']['gpu'] or result['machine']['cpu']}")
    copy, mm = ceil["copy_GBps"], ceil["fp32_TFLOPs"]
    print(f"ceilings: copy {copy:.1f} GB/s, fp32 matmul {mm:.2f} TFLOP/s\n")
    print(
        table(
            krows,
            [
                "case",
                "impl",
                "ms",
                "ref_ms",
                "speedup",
                "GBps",
                "bw_frac",
                "TFLOPs",
                "flop_frac",
                "rel_err",
            ],
        )
    )
    print()
    print(
        table(
            lrows,
            [
                "case",
                "impl",
                "ms",
                "peak_MiB",
                "speedup_vs_jacrev",
                "speedup_vs_jacfwd",
                "grad_rel_err",
            ],
        )
    )
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
