"""Checks of a log-det call's inputs and outputs, and how the engine reports a problem.

Bad input is a ``ValueError``/``TypeError`` that names the argument and what was expected. A
problem of the numbers (a singular JᵀJ, an unconverged CG) is a ``RuntimeWarning`` that points at
the user's call, the first frame outside rnf_fast (and torch), wherever in the engine it arises;
or a :class:`SingularJacobianError` on request.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_rows
from .options import CG
from .precondition import check_preconditioner

__all__ = [
    "LINALG_DTYPES",
    "MEMORY_SHARE",
    "NONDETERMINISTIC_LAYERS",
    "OnSingular",
    "SINGULAR_C",
    "SINGULAR_C_16BIT",
    "SingularJacobianError",
    "available_memory",
    "check_cg_against",
    "check_cg_memory",
    "check_decoder",
    "check_decoder_call",
    "check_jacobian_nonzero",
    "check_on_singular",
    "check_output",
    "check_output_shape",
    "check_z",
    "linalg_dtype_for",
    "pivot_floor",
    "report_singular",
    "ritz_floor",
    "singular_c",
    "warn_at_caller",
]

OnSingular = Literal["jitter", "raise", "nan"]


class SingularJacobianError(RuntimeError):
    """JᵀJ is not numerically positive definite for some samples (J is rank deficient)."""


def _internal(module: str) -> bool:
    return module.split(".", 1)[0] in ("rnf_fast", "torch")


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside rnf_fast and torch: the line of
    user code that called into the library (torch's frames are skipped too, because
    ``logdet_grad`` is wrapped by ``torch.compiler.disable`` and may run inside a module's
    ``__call__``)."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 1 is this function, 2 its caller
    while frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


SINGULAR_C = 100.0
"""How many units of rounding a sample's smallest direction must clear to count as resolved.

J is computed in the decoder's dtype (eps_J), A = JᵀJ is formed and factored in the linalg dtype
(eps_A). A direction of J below about eps_J · ‖J‖, or an eigenvalue of A below about eps_A · ‖A‖,
is rounding, not geometry. Over 50 seeds of rank-deficient decoders (a rank-1 ``nn.Linear(2, 6)``
and a 3-layer tanh MLP whose first layer has rank 2 < d = 3), the largest scaled Cholesky pivot
l_i / ‖J e_i‖ was 7.9 eps_J (float32) and the largest l_i² / A_ii 11 eps_A (float64): c = 100
leaves a factor ~10 of margin. A flagged sample has κ(J) > 1 / (100 eps_J) = 8.4e4 in float32
(6.7e6 in float64 through the float64 Gram), where rounding alone moves σ_min(J) by >= 1%."""
RITZ_C = 3.0
"""CG's floor of θ_min / θ_max is RITZ_C · eps of the products' dtype. Products in float32
resolve A's spectrum only down to about eps · ‖A‖, and a rank-deficient J shows Ritz ratios of
that order (every seed of the rank-deficient tests is flagged at c = 2 and 3), while well-posed
problems stay far above it (>= 1e-3 on the benchmark suite's MLP at d = 128 and MNIST-sized
flow; 1e-6 for κ(J) = 1e3, not flagged). A flagged system has κ(A) > 2.8e6 in float32
(κ(J) > 1.7e3). CG cannot resolve what exact can (exact flags from κ(J) > 8.4e4: it forms A
in float64).

Products in a 16-bit type use another floor, (:data:`SINGULAR_C_16BIT` · eps)²: see
:func:`ritz_floor`."""


SINGULAR_C_16BIT = 10.0
""":data:`SINGULAR_C` for a J whose products run in a 16-bit type (a bf16 or fp16 decoder, or a
float32 one under a 16-bit autocast). A 16-bit GEMM accumulates in float32 and rounds once, so
rounding moves J's directions less, in units of its eps, than float32's chains of roundings: over
50 seeds of the same rank-deficient decoders, the largest l_i / ‖J e_i‖ was 1.8 eps_J in bf16,
fp16 and bf16 autocast alike. But eps_bf16 = 2⁻⁷ is large: c = 100 flags every pivot angle
below 51° (κ(J) > 1.3), and the smallest pivot of a healthy 3-32-8 tanh MLP over those seeds
was 21.5 eps_bf16 (0.17). c = 10 sits a factor 5.5 above the first and 2 below the second: a
flagged sample has κ(J) > 1 / (10 eps_J) = 12.8 in bf16 (102 in fp16), where rounding alone
moves σ_min(J) by up to 18%."""


def singular_c(dtype: torch.dtype) -> float:
    """:data:`SINGULAR_C_16BIT` for a 16-bit dtype, else :data:`SINGULAR_C`."""
    return SINGULAR_C_16BIT if torch.finfo(dtype).bits == 16 else SINGULAR_C


def pivot_floor(jacobian_dtype: torch.dtype, linalg_dtype: torch.dtype) -> float:
    """The floor of the scaled Cholesky pivots ρ_i = l_i² / A_ii below which a sample is
    numerically singular: max((c_J · eps_J)², c · eps_A), c = :data:`SINGULAR_C`, c_J =
    :func:`singular_c` of ``jacobian_dtype`` (the precision of J's products).

    ρ_i is the squared sine of the angle between column i of J and the span of the columns
    before it (scale-free per column), and ρ_i >= λ_min(A) / λ_max(A): a flagged sample has
    κ(J) > 1 / max(c_J · eps_J, √(c · eps_A)), so no well-conditioned sample is ever flagged."""
    eps_j = torch.finfo(jacobian_dtype).eps
    eps_a = torch.finfo(linalg_dtype).eps
    return max((singular_c(jacobian_dtype) * eps_j) ** 2, SINGULAR_C * eps_a)


def ritz_floor(matvec_dtype: torch.dtype) -> float:
    """The floor of θ_min / θ_max, the ratio of the extreme Lanczos (Ritz) values of CG, below
    which a system is numerically singular: c · eps of the dtype the products Jᵀ(J p) are computed
    in (their rounding is about eps · ‖A‖ ‖p‖), c = :data:`RITZ_C`. Ritz values lie inside
    A's spectrum, so a flagged system has κ(A) > 1 / (c · eps).

    For 16-bit products (a bf16 or fp16 decoder, or a 16-bit autocast) the floor is
    (c₁₆ · eps)², c₁₆ = :data:`SINGULAR_C_16BIT`, the exact path's floor on J's angles: the
    rounding of Ĵᵀ(Ĵ p) perturbs A by JᵀE + E'ᵀJ, which moves λ_min by about 2 σ_min ‖E‖, so
    the products resolve λ_min / λ_max down to about (γ u)², not u. c · eps would flag κ(A) > 43
    in bf16 (κ(J) > 6.5, well-conditioned samples); this floor flags κ(J) > 12.8 (bf16), 102
    (fp16). At 16 bits it is a screen, not a proof: at the default K = 1 and tol 1e-2, over 20
    seeds of 16 samples it flagged every sample of the rank-1 linear decoder, 303 to 306 of the
    320 of the rank-deficient 3-layer MLP (bf16, fp16, bf16 autocast) and none of the healthy
    3-32-8 MLP; the rank-deficient and healthy ratios overlap at 16 bits (0.6 to 4.8 eps in
    bf16), so no floor separates them all. The exact method, whose floor is set on J, does."""
    eps = torch.finfo(matvec_dtype).eps
    if torch.finfo(matvec_dtype).bits == 16:
        return (SINGULAR_C_16BIT * eps) ** 2
    return RITZ_C * eps


def report_singular(
    singular: Tensor,
    on_singular: OnSingular,
    where: str,
    *,
    dtype: torch.dtype,
    jittered: int = 0,
    nan: Tensor | None = None,
) -> None:
    """Raise or warn (one warning per call) about samples whose JᵀJ is numerically singular.

    Arguments:
        singular: (B,) bool, the samples concerned.
        on_singular: ``"raise"`` raises :class:`SingularJacobianError`; otherwise a warning.
        where: what found it, for the message.
        dtype: the decoder's dtype (the precision J is rank deficient to).
        jittered: how many of them needed jitter for their Cholesky factorisation.
        nan: (B,) bool, those whose log det is NaN (default: all of ``singular``).
    """
    if not bool(singular.any()):
        return
    idx = singular.nonzero().squeeze(-1).tolist()
    msg = (
        f"JᵀJ is numerically singular for {len(idx)} sample(s) {idx[:10]}"
        f"{'...' if len(idx) > 10 else ''} ({where}): the decoder's Jacobian is rank deficient "
        f"to {str(dtype).removeprefix('torch.')} precision there"
    )
    if on_singular == "raise":
        raise SingularJacobianError(msg)
    n_nan = len(idx) if nan is None else int((nan & singular).sum())
    parts = []
    if jittered:
        parts.append(
            f"{jittered} needed jitter for the Cholesky factorisation (their log det is that of "
            "JᵀJ + jitter·I, see LogdetInfo.exact.jitter with return_info=True)"
        )
    if n_nan:
        parts.append(f"{n_nan} have a NaN log det")
    kept = len(idx) - n_nan - jittered
    if kept > 0:
        parts.append(
            f"{kept} keep a log det dominated by rounding (on_singular='nan' makes it NaN, "
            "'raise' raises)"
        )
    warn_at_caller(msg + "; " + "; ".join(parts) + " (LogdetInfo.singular marks them)")


def check_z(z: object) -> Tensor:
    """z must be a finite floating-point (B, d) tensor with B, d >= 1."""
    return check_rows("z", z, rows="B", what="d")


_nn = torch.nn
NONDETERMINISTIC_LAYERS: dict[str, tuple[type[torch.nn.Module], ...]] = {
    "Dropout": (
        _nn.Dropout,
        _nn.Dropout1d,
        _nn.Dropout2d,
        _nn.Dropout3d,
        _nn.AlphaDropout,
        _nn.FeatureAlphaDropout,
    ),
    "BatchNorm": (
        _nn.BatchNorm1d,
        _nn.BatchNorm2d,
        _nn.BatchNorm3d,
        _nn.SyncBatchNorm,
        _nn.LazyBatchNorm1d,
        _nn.LazyBatchNorm2d,
        _nn.LazyBatchNorm3d,
    ),
    "InstanceNorm": (
        _nn.InstanceNorm1d,
        _nn.InstanceNorm2d,
        _nn.InstanceNorm3d,
        _nn.LazyInstanceNorm1d,
        _nn.LazyInstanceNorm2d,
        _nn.LazyInstanceNorm3d,
    ),
}
"""The layers that can make a decoder other than a deterministic row-wise function, by family.
In training mode Dropout (p > 0) draws a new mask on every call (the primal, each tangent and
each CG product would see a different function), BatchNorm normalises by the batch's statistics
(rows coupled) and updates its running statistics in place, and InstanceNorm with
``track_running_stats`` updates them too. A BatchNorm without running statistics uses the batch's
statistics in eval mode as well. Functional calls (``F.dropout`` in a ``forward``) are not seen."""


def _nondeterministic(module: torch.nn.Module) -> str | None:
    """Why a layer makes the decoder random or batch-coupled, or None."""
    for family, types in NONDETERMINISTIC_LAYERS.items():
        if not isinstance(module, types):
            continue
        kind = type(module).__name__
        if family == "Dropout":
            return f"{kind} in training mode" if module.training and module.p > 0 else None
        stats = getattr(module, "track_running_stats", False)
        if family == "BatchNorm" and not stats:
            return f"{kind} without running statistics (it uses the batch's statistics)"
        if module.training and (family == "BatchNorm" or stats):
            return f"{kind} in training mode"
    return None


def check_decoder(decoder: object, z: Tensor) -> None:
    """The decoder is callable; a module's parameters match z's dtype and device, and none of its
    layers is random or couples the rows (:data:`NONDETERMINISTIC_LAYERS`)."""
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    if isinstance(decoder, torch.nn.Module):
        p = next(iter(decoder.parameters()), None)
        if p is not None and (p.dtype != z.dtype or p.device != z.device):
            raise ValueError(
                f"decoder parameters are {p.dtype} on {p.device} but z is {z.dtype} on "
                f"{z.device}; move one of them (e.g. decoder.to(z))"
            )
        for name, module in decoder.named_modules():
            why = _nondeterministic(module)
            if why is not None:
                raise ValueError(
                    f"decoder has {why} (layer {name or type(module).__name__!r}): its Jacobian "
                    "is random or couples the rows, so log det(JᵀJ) is not defined per sample; "
                    "call decoder.eval() (and give BatchNorm running statistics) before "
                    "logdet_grad"
                )


def check_decoder_call(decoder: Callable[[Tensor], Tensor], z: Tensor, error: Exception) -> None:
    """After ``error`` escaped a log-det call, call the decoder once on z itself: raise a
    ``ValueError`` (chained to the decoder's own error) if it fails on z of shape (B, d), a
    ``TypeError`` if it returns something other than a tensor; else return, and the caller
    re-raises ``error``. Runs on the failure path only: a successful call pays nothing."""
    B, d = z.shape
    try:
        out = decoder(z.detach())
    except Exception as exc:
        raise ValueError(
            f"decoder failed on z of shape (B, d) = ({B}, {d}): {type(exc).__name__}: {exc}; "
            "does it take latents of width d?"
        ) from exc
    if not isinstance(out, Tensor):
        items = f" of {len(out)} items" if isinstance(out, (tuple, list)) else ""
        raise TypeError(
            f"decoder must return a (B, D) tensor, got {type(out).__name__}{items}"
        ) from error


def check_jacobian_nonzero(zero: bool) -> None:
    """Raise if J = 0 at every sample (``zero``): the decoder's output does not depend on z."""
    if zero:
        raise ValueError(
            "the decoder's output does not depend on z: J = 0 at every sample, so JᵀJ = 0 and "
            "log det(JᵀJ) = -inf"
        )


MEMORY_SHARE = 0.5
"""The share of the available memory that the CG buffers may take before a call is refused."""


def available_memory(device: torch.device) -> int | None:
    """Bytes available on ``device``: free CUDA memory, or the system's available RAM on CPU
    (psutil if installed, else MemAvailable of /proc/meminfo, else free pages); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _bytes(n: float) -> str:
    """A byte count in the largest unit that keeps it >= 1 (B to PB)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} PB"


_QUERY_ABOVE = 2**26  # bytes (64 MiB)


def check_cg_memory(cg: CG, z: Tensor, linalg_dtype: torch.dtype) -> None:
    """Refuse, before anything is allocated (the decoder has not run, so D >= d + 1 stands for
    D), probes whose CG buffers would exceed :data:`MEMORY_SHARE` of the available memory: six
    (B, K, d) buffers (probes, x, r, p, A p, solution) and the (B, K, max_iter) Lanczos
    coefficients twice in the linalg dtype, and three (B, K, D) tangent buffers (J p, the running
    image J u, the surrogate's J v) in z's dtype."""
    B, d = z.shape
    K, M, D = cg.K, d if cg.max_iter is None else cg.max_iter, d + 1
    ls = torch.finfo(linalg_dtype).bits // 8
    zs = torch.finfo(z.dtype).bits // 8
    need = B * K * ((6 * d + 2 * M) * ls + 3 * D * zs)
    if need < _QUERY_ABOVE:  # no machine lacks this much: spare every call the memory query
        return
    free = available_memory(z.device)
    if free is not None and need > MEMORY_SHARE * free:
        raise ValueError(
            f"probes={K}: the CG buffers for B={B}, K={K}, d={d} need at least {_bytes(need)}, "
            f"more than {MEMORY_SHARE:.0%} of the {_bytes(free)} available on {z.device}; use "
            "fewer probes or a smaller batch"
        )


def check_on_singular(on_singular: object) -> None:
    if on_singular not in ("jitter", "raise", "nan"):
        raise ValueError(f"on_singular must be 'jitter', 'raise' or 'nan', got {on_singular!r}")


LINALG_DTYPES = (torch.float32, torch.float64)
"""The dtypes JᵀJ, its Cholesky factor and the CG state may take: never a 16-bit type, where
cond(JᵀJ) = cond(J)² would exhaust bf16's 8 bits at cond(J) = 16."""


def linalg_dtype_for(z: Tensor, linalg_dtype: object) -> torch.dtype:
    """The dtype of JᵀJ, its factor and the CG state: the given one (float32 or float64), else
    float64 for a lower precision z (cond(JᵀJ) = cond(J)², so a float32 Cholesky fails first),
    else z's dtype."""
    if linalg_dtype is not None:
        if linalg_dtype not in LINALG_DTYPES:
            raise ValueError(
                f"linalg_dtype must be torch.float32 or torch.float64, got {linalg_dtype!r}"
            )
        return linalg_dtype
    return torch.float64 if z.dtype in (torch.float32, torch.float16, torch.bfloat16) else z.dtype


def check_cg_against(cg: CG, z: Tensor) -> None:
    """The CG options' tensors and counts against z (B, d): probes, x0, preconditioner and the
    generator's device, and K <= d for orthogonal probes."""
    B, d = z.shape
    probes = cg.probes
    if isinstance(probes, Tensor):
        if probes.shape[0] != B or probes.shape[2] != d:
            raise ValueError(
                f"probes tensor must be (B, K, d) = ({B}, K>=1, {d}), got {tuple(probes.shape)}"
            )
        if probes.device != z.device:
            raise ValueError(f"probes are on {probes.device} but z is on {z.device}")
    elif cg.probe_kind == "orthogonal" and d < cg.K:
        raise ValueError(f"orthogonal probes need probes <= d, got probes={cg.K} and d={d}")
    if cg.generator is not None and cg.generator.device.type != z.device.type:
        raise ValueError(f"generator is on {cg.generator.device} but z is on {z.device}")
    check_preconditioner(cg.preconditioner, B, d)
    x0 = cg.x0
    if x0 is not None:
        if tuple(x0.shape) != (B, cg.K, d):
            raise ValueError(f"x0 must be (B, K, d) = ({B}, {cg.K}, {d}), got {tuple(x0.shape)}")
        if not x0.is_floating_point() or x0.device != z.device:
            raise ValueError(
                f"x0 must be floating point on {z.device}, got {x0.dtype} on {x0.device}"
            )
        if not bool(torch.isfinite(x0).all()):
            raise ValueError("x0 contains NaN or Inf")


def check_output_shape(out: Tensor, z: Tensor, autocast: torch.dtype | None = None) -> None:
    """Shapes, dtype and device of the decoder's output: no host synchronisation. The output
    is in z's dtype, or in ``autocast`` (the caller's autocast dtype, where it applies)."""
    B, d = z.shape
    if not isinstance(out, Tensor):
        raise TypeError(f"decoder must return a (B, D) tensor, got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != B:
        raise ValueError(f"decoder output must be (B, D) = ({B}, D), got {tuple(out.shape)}")
    if out.shape[1] <= d:
        raise ValueError(f"decoder must map d={d} to D > d dimensions, got D={out.shape[1]}")
    if out.dtype not in (z.dtype, autocast) or out.device != z.device:
        under = "" if autocast is None else f" (or {autocast} under autocast)"
        raise ValueError(
            f"decoder output is {out.dtype} on {out.device} but z is {z.dtype}{under} on {z.device}"
        )


def check_output(out: Tensor, z: Tensor, autocast: torch.dtype | None = None) -> None:
    """:func:`check_output_shape`, and that the output is finite (a host synchronisation)."""
    B = z.shape[0]
    check_output_shape(out, z, autocast)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).any(1).sum())
        raise ValueError(f"decoder output contains NaN or Inf in {bad} of {B} samples")


def check_lin_output(
    lin: object, z: Tensor, autocast: torch.dtype | None = None, *, finite: bool = True
) -> torch.dtype:
    """:func:`check_output` (``finite``) or :func:`check_output_shape` of a linearization's
    output; returns the output's dtype. A linearization that has not run its last layer (an
    MLP's final Linear, which the log det does not need) may offer ``output_spec()``, a
    stand-in with the output's shape, dtype and device, and ``output_surely_finite()``: the
    output itself is then computed only when it may not be finite."""
    spec = getattr(lin, "output_spec", None)
    template = spec() if callable(spec) else None
    if template is None:
        (check_output if finite else check_output_shape)(lin.out, z, autocast)
        return lin.out.dtype
    check_output_shape(template, z, autocast)
    if finite and not lin.output_surely_finite():
        check_output(lin.out, z, autocast)
    return template.dtype
