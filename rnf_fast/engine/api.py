"""log det(JᵀJ) of a decoder and its gradient: exact (Cholesky) and stochastic (Hutchinson + CG).

Both estimators build one surrogate (see DESIGN.md §2)

    S = c · Σ_k ⟨ stopgrad(J A⁻¹ v_k), J v_k ⟩,     A = JᵀJ,

exact with V = I_d and c = 2, stochastic with K probes (E[v vᵀ] = I) and c = 2/K, and return
``value.detach() + (S - S.detach())``: the value is log det A, the gradient is that of log det A.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..kernels import allow_triton
from ..linearize.base import Batching, Linearization, linearize
from ..ops.dispatch import get_backend
from .cg import batched_cg
from .precondition import build_preconditioner, check_preconditioner
from .probes import PROBE_KINDS, ProbeKind, make_probes

__all__ = [
    "AUTO_COST_MODEL",
    "AUTO_EXACT_OVER_CG1",
    "AUTO_EXPECTED_MATVECS",
    "DEFAULT_CG_TOL",
    "LogdetInfo",
    "SingularJacobianError",
    "choose_method",
    "logdet",
    "logdet_grad",
    "predicted_costs",
]

Method = Literal["auto", "exact", "cg"]

DEFAULT_CG_TOL = 1e-2
"""Default relative residual tolerance of CG. Measured on the standard MLP problem with K = 1
(``bench/study_cg_tol.py``): the CG error of the gradient at 1e-2 is 0.5% of the gradient and
250x below the Hutchinson noise, in 7.3 iterations against 11.1 at 1e-4."""

# Time of one exact step over one CG step with K = 1, against d, for each linearization path:
# the MLP decoder d -> 256 -> 256 -> 784, B = 64, float32, quiet 2-core CPU (bench/study_auto.py,
# bench/results/auto.md). Above 1, CG is faster. The measurements behind AUTO_COST_MODEL, which
# reproduces every one of these K = 1 decisions with a margin over 15%; at the near-tie it
# misses (generic, d = 64: 1.11) its choice costs 11% more.
AUTO_EXACT_OVER_CG1: dict[str, tuple[tuple[int, float], ...]] = {
    "explicit": (
        (4, 0.90),
        (8, 0.95),
        (16, 1.33),
        (32, 2.44),
        (64, 2.59),
        (128, 1.93),
        (256, 1.20),
    ),
    "generic": ((4, 0.38), (8, 0.41), (16, 0.46), (32, 0.64), (64, 1.11), (128, 0.65), (256, 0.53)),
}

AUTO_COST_MODEL: dict[str, dict[str, tuple[float, ...]]] = {
    "explicit": {
        "exact": (4.044, 0.4131, 0.005290),
        "cg": (3.593, 1.201, 0.4528, 0.0, 8.1e-06, 2.886e-03),
    },
    "generic": {
        "exact": (4.889, 0.6437, 0.006820),
        "cg": (4.123, 1.683, 2.999, 0.3632, 9.4e-06, 2.997e-03),
    },
}
"""Step time in ms (B = 64) of each method, fitted to bench/results/auto.md (quiet 2-core CPU):
exact = e0 + e1·d + e2·d² (primal, d tangents and their backward, JᵀJ and A⁻¹Jᵀ) and
cg = c0 + c1·K + m·(c2 + c3·K) + c4·K·m³ + c5·K·m·d (K differentiable tangents, m batched
matvecs with a fixed and a per-probe part, the Lanczos eigen-solves, the d-wide ends of each
product), m the matvecs CG needs. Per matvec the generic path pays about 3 ms (it re-runs the
primal), the explicit one about 0.5 ms: so CG only wins on the explicit path."""

AUTO_EXPECTED_MATVECS: tuple[tuple[int, float], ...] = (
    (4, 4.0),
    (8, 6.3),
    (16, 9.0),
    (32, 12.0),
    (64, 20.7),
    (128, 70.0),
    (256, 256.0),
)
"""Batched matvecs of CG (K = 1, default tolerance, mean of 3 probe draws) against d on the
standard MLP problem (bench/study_auto.py; K = 4 needs up to 10% more). A trained digits flow
(d = 10) needs 8.25 (bench/results/precond.md)."""


def _interp_log2(table: tuple[tuple[int, float], ...], d: float) -> float:
    x = math.log2(min(max(d, table[0][0]), table[-1][0]))
    for (d0, y0), (d1, y1) in zip(table, table[1:]):
        if x <= math.log2(d1):
            t = (x - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
            return y0 + t * (y1 - y0)
    return table[-1][1]


def predicted_costs(
    d: int, K: int, *, path: str = "generic", matvecs: float | None = None
) -> tuple[float, float]:
    """Predicted step times (exact, cg) in ms at B = 64 from :data:`AUTO_COST_MODEL`.

    Arguments:
        d: latent dimension, clamped to the measured range 4..256.
        K: probes per sample of CG.
        path: ``"explicit"`` or ``"generic"``.
        matvecs: CG's batched matvecs m; default: :data:`AUTO_EXPECTED_MATVECS` at d.

    Returns:
        (exact ms, cg ms).
    """
    if path not in AUTO_COST_MODEL:
        raise ValueError(f"path must be one of {sorted(AUTO_COST_MODEL)}, got {path!r}")
    d = min(max(d, AUTO_EXPECTED_MATVECS[0][0]), AUTO_EXPECTED_MATVECS[-1][0])
    m = _interp_log2(AUTO_EXPECTED_MATVECS, d) if matvecs is None else float(matvecs)
    e0, e1, e2 = AUTO_COST_MODEL[path]["exact"]
    c0, c1, c2, c3, c4, c5 = AUTO_COST_MODEL[path]["cg"]
    cg = c0 + c1 * K + m * (c2 + c3 * K) + c4 * K * m**3 + c5 * K * m * d
    return e0 + e1 * d + e2 * d * d, cg


class SingularJacobianError(RuntimeError):
    """JᵀJ is not numerically positive definite for some samples (J is rank deficient)."""


@dataclass
class LogdetInfo:
    """What a call to :func:`logdet_grad` did.

    Attributes:
        method: ``"exact"`` or ``"cg"``.
        backend: the backend of the small ops.
        batching: how tangents were batched (``"vmap"`` or ``"repeat"``, or the decoder's own
            linearization).
        fallback_reason: why vmap was abandoned, if it was.
        linalg_dtype: dtype of JᵀJ, the Cholesky factor and the CG state.
        probes: K (d for the exact path).
        matvecs: number of batched JᵀJ products (CG) or 0.
        cg_iterations: (B, K) iterations per system (CG only).
        residuals: (B, K) final relative residuals ‖r‖/‖v‖ (CG only).
        converged: (B, K) whether each system met the tolerance (CG only).
        jitter: (B,) absolute jitter added to JᵀJ (exact only, 0 where none was needed).
        singular: (B,) samples whose JᵀJ was not numerically positive definite.
        preconditioner: ``"jacobi"``, ``"batch"``, ``"given"`` or None (CG only).
        solution: (B, K, d) the CG solutions u_k = A⁻¹ v_k, v_k = L ε_k (v_k = ε_k without a
            preconditioner), in ``linalg_dtype``: a warm start ``x0`` for a later call with the
            same probes and preconditioner (CG only).
        value_available: False when the returned value is not an estimate of log det A (it
            is then NaN; the gradient is still right).
        value_unavailable_reason: why, when ``value_available`` is False.
        gram: how the exact path formed A: ``"tangents"`` (J from d tangents, then JᵀJ) or
            ``"factored"`` (A = Mᵀ(WᵀW)M without J, see ``SequentialLinearization.gram``).
    """

    method: str
    backend: str
    batching: str
    fallback_reason: str | None
    linalg_dtype: torch.dtype
    probes: int
    matvecs: int = 0
    cg_iterations: Tensor | None = None
    residuals: Tensor | None = None
    converged: Tensor | None = None
    jitter: Tensor | None = None
    singular: Tensor | None = None
    preconditioner: str | None = None
    solution: Tensor | None = None
    value_available: bool = True
    value_unavailable_reason: str | None = None
    gram: str | None = None


def choose_method(d: int, K: int, *, path: str = "generic", matvecs: float | None = None) -> str:
    """The ``method="auto"`` rule: the cheaper of exact and CG under the measured cost model.

    The exact path costs one primal and d tangents pushed together (and their backward), then
    JᵀJ and A⁻¹Jᵀ (d² D per sample); CG costs K differentiable tangents, m batched matvecs (a
    JVP and a VJP for K probes each) and the Lanczos eigen-solves. :func:`predicted_costs`
    evaluates both from :data:`AUTO_COST_MODEL` with m from :data:`AUTO_EXPECTED_MATVECS`;
    it picks the faster method at all 28 measured points (d = 4..256, K = 1 and 4, both
    paths; bench/results/auto.md; the closest call, explicit d = 32 with K = 4, is a 6% tie).
    On the generic ``torch.func`` path exact wins at every d; on the explicit path CG with
    K = 1 wins from d = 8 up, with K = 4 from d = 32 to 64. Outside d = 4..256 the decision
    at the nearest measured d is used.

    Arguments:
        d: latent dimension.
        K: probes per sample the stochastic path would use.
        path: ``"explicit"`` (a linearization with cached factors) or ``"generic"``.
        matvecs: expected CG matvecs, if known better than the default (e.g. with a
            preconditioner, or from an earlier step's ``LogdetInfo.matvecs``).

    Returns:
        ``"exact"`` or ``"cg"``.
    """
    exact, cg = predicted_costs(d, K, path=path, matvecs=matvecs)
    return "cg" if cg < exact else "exact"


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_z(z: object) -> Tensor:
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (B, d), got {type(z).__name__}")
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 1:
        raise ValueError(f"z must be (B, d) with B, d >= 1, got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
    if not bool(torch.isfinite(z).all()):
        bad = int((~torch.isfinite(z)).any(1).sum())
        raise ValueError(f"z contains NaN or Inf in {bad} of {z.shape[0]} samples")
    return z


def _check_decoder(decoder: object, z: Tensor) -> None:
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    if isinstance(decoder, torch.nn.Module):
        p = next(iter(decoder.parameters()), None)
        if p is not None and (p.dtype != z.dtype or p.device != z.device):
            raise ValueError(
                f"decoder parameters are {p.dtype} on {p.device} but z is {z.dtype} on "
                f"{z.device}; move one of them (e.g. decoder.to(z))"
            )


def _check_output_shape(out: Tensor, z: Tensor) -> None:
    """Shapes, dtype and device of the decoder's output: no host synchronisation."""
    B, d = z.shape
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != B:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"decoder output must be (B, D) = ({B}, D), got {shape}")
    if out.shape[1] <= d:
        raise ValueError(f"decoder must map d={d} to D > d dimensions, got D={out.shape[1]}")
    if out.dtype != z.dtype or out.device != z.device:
        raise ValueError(
            f"decoder output is {out.dtype} on {out.device} but z is {z.dtype} on {z.device}"
        )


def _check_output(out: Tensor, z: Tensor) -> None:
    """:func:`_check_output_shape`, and that the output is finite (a host synchronisation)."""
    B = z.shape[0]
    _check_output_shape(out, z)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).any(1).sum())
        raise ValueError(f"decoder output contains NaN or Inf in {bad} of {B} samples")


def _check_probes(probes: int | Tensor, z: Tensor) -> int:
    """Validate ``probes`` (a count or a (B, K, d) tensor) and return K."""
    B, d = z.shape
    if not isinstance(probes, Tensor):
        return _check_positive_int("probes", probes)
    if probes.dim() != 3 or probes.shape[0] != B or probes.shape[2] != d or probes.shape[1] < 1:
        raise ValueError(
            f"probes tensor must be (B, K, d) = ({B}, K>=1, {d}), got {tuple(probes.shape)}"
        )
    if probes.device != z.device:
        raise ValueError(f"probes are on {probes.device} but z is on {z.device}")
    return probes.shape[1]


def _check_x0(x0: object, z: Tensor, K: int) -> None:
    if x0 is None:
        return
    B, d = z.shape
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be None or a (B, K, d) tensor, got {type(x0).__name__}")
    if tuple(x0.shape) != (B, K, d):
        raise ValueError(f"x0 must be (B, K, d) = ({B}, {K}, {d}), got {tuple(x0.shape)}")
    if not x0.is_floating_point() or x0.device != z.device:
        raise ValueError(f"x0 must be floating point on {z.device}, got {x0.dtype} on {x0.device}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or Inf")


def _draw_probes(
    probes: int | Tensor, z: Tensor, probe_kind: str, generator: torch.Generator | None
) -> Tensor:
    if isinstance(probes, Tensor):
        return probes.to(z.dtype)
    if generator is not None and generator.device.type != z.device.type:
        raise ValueError(f"generator is on {generator.device} but z is on {z.device}")
    B, d = z.shape
    return make_probes(
        B, probes, d, kind=probe_kind, generator=generator, dtype=z.dtype, device=z.device
    )


def _linalg_dtype(z: Tensor, linalg_dtype: torch.dtype | None) -> torch.dtype:
    if linalg_dtype is not None:
        if not isinstance(linalg_dtype, torch.dtype) or not linalg_dtype.is_floating_point:
            raise ValueError(f"linalg_dtype must be a floating torch.dtype, got {linalg_dtype!r}")
        return linalg_dtype
    return torch.float64 if z.dtype in (torch.float32, torch.float16, torch.bfloat16) else z.dtype


def _report_singular(singular: Tensor, on_singular: str, what: str) -> None:
    if not bool(singular.any()):
        return
    idx = singular.nonzero().squeeze(-1).tolist()
    msg = (
        f"JᵀJ is not numerically positive definite for {len(idx)} sample(s) {idx[:10]}"
        f"{'...' if len(idx) > 10 else ''} ({what}): the decoder's Jacobian is rank deficient "
        "there"
    )
    if on_singular == "raise":
        raise SingularJacobianError(msg)
    warnings.warn(msg + "; their log det is NaN", RuntimeWarning, stacklevel=5)


def _tangent_inner(lin: Linearization, V: Tensor, W: Tensor) -> Tensor:
    """Σ_k ⟨W_k, J V_k⟩ per sample, differentiable through J."""
    return (W * lin.jvp(V, create_graph=True)).sum((1, 2))


def _gram(ops, JT: Tensor, ldtype: torch.dtype, block: int = 256) -> Tensor:
    """A = JᵀJ in ``ldtype`` from JT (B, d, D), casting blocks of D at a time so no full
    higher-precision copy of J is held (it would be the largest buffer of the exact path)."""
    if JT.dtype == ldtype:
        return ops.gram(JT.transpose(1, 2))
    return sum(
        ops.gram(JT[:, :, s : s + block].transpose(1, 2).to(ldtype))
        for s in range(0, JT.shape[2], block)
    )


def _factor(ops, A: Tensor, on_singular: str, info) -> tuple[Tensor, Tensor]:
    """Cholesky of A (B, d, d) in the linear-algebra dtype with bounded jitter: (L, log det A)."""
    steps = ops.JITTER_STEPS if on_singular == "jitter" else ()
    L, value, jitter, cinfo = ops.cholesky_logdet(A, jitter_steps=steps)
    info.jitter, info.singular = jitter, cinfo > 0
    _report_singular(info.singular, on_singular, "exact path")
    if bool((jitter > 0).any()):
        n = int((jitter > 0).sum())
        warnings.warn(
            f"JᵀJ is singular to working precision for {n} sample(s) and needed jitter for its "
            "Cholesky factorisation; their log det is that of JᵀJ + jitter·I (see "
            "LogdetInfo.jitter with return_info=True)",
            RuntimeWarning,
            stacklevel=5,
        )
    return L, value


def _inverse(ops, L: Tensor, singular: Tensor, dtype: torch.dtype) -> Tensor:
    """A⁻¹ (B, d, d) from its Cholesky factor, in ``dtype``; zero for singular samples (NaN
    value), so they contribute no gradient."""
    d = L.shape[-1]
    if bool(singular.any()):
        L = torch.where(singular[:, None, None], torch.eye(d, dtype=L.dtype, device=L.device), L)
    inv = ops.cholesky_inverse(L).to(dtype)
    return torch.where(singular[:, None, None], torch.zeros_like(inv), inv)


def _exact(lin, z, ops, ldtype, chunk_size, need_grad, on_singular, info):
    B, d = z.shape
    # A linearization that can form A = JᵀJ without J (a decoder ending in a linear layer W
    # narrower than D: A = Mᵀ(WᵀW)M) returns it from gram(); the surrogate is then
    # tr(stopgrad(A⁻¹) A), whose gradient is tr(A⁻¹ ∂A) = ∂ log det A.
    gram = getattr(lin, "gram", None)
    A_graph = gram(create_graph=need_grad) if callable(gram) and chunk_size is None else None
    if A_graph is not None:
        _check_output(lin.out, z)
        info.gram = "factored"
        L, value = _factor(ops, A_graph.detach().to(ldtype), on_singular, info)
        if not need_grad:
            return value, None
        return value, (_inverse(ops, L, info.singular, z.dtype) * A_graph).sum((1, 2))
    info.gram = "tangents"
    E = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)  # row k is e_k
    c = d if chunk_size is None else min(chunk_size, d)
    starts = range(0, d, c)
    if need_grad and c == d:
        JT = lin.jvp(E, create_graph=True)  # (B, d, D): JT[:, k] = J e_k
    else:
        JT = torch.cat([lin.jvp(E[:, s : s + c]) for s in starts], dim=1)
    _check_output(lin.out, z)
    L, value = _factor(ops, _gram(ops, JT.detach(), ldtype), on_singular, info)
    if not need_grad:
        return value, None
    # Rows of A⁻¹Jᵀ are the columns of J A⁻¹ (A symmetric), the detached half of S. A d×d
    # inverse then one GEMM in the model's dtype is ~2.5x cheaper than a (d, D) triangular solve.
    WT = _inverse(ops, L, info.singular, z.dtype) @ JT.detach()
    if c == d:
        S = 2.0 * (WT * JT).sum((1, 2))
    else:
        # Each chunk's graph is rebuilt inside backward: peak memory scales with chunk_size.
        S = 2.0 * sum(
            checkpoint(_tangent_inner, lin, E[:, s : s + c], WT[:, s : s + c], use_reentrant=False)
            for s in starts
        )
    return value, S


def _cg(
    lin,
    z,
    backend,
    ldtype,
    V,
    tol,
    max_iter,
    fixed_iterations,
    need_grad,
    on_singular,
    info,
    prec,
    x0,
):
    """Hutchinson + CG, optionally split-preconditioned (M = L Lᵀ) and warm-started.

    The probes V are ε (E[εεᵀ] = I); CG solves Ã y = ε, Ã = L⁻¹ A L⁻ᵀ (Ã = A without a
    preconditioner), u = L⁻ᵀ y = A⁻¹ L ε, w = L⁻ᵀ ε, and S = (2/K) Σ ⟨stopgrad(J u), J w⟩
    (see :mod:`rnf_fast.engine.precondition`). The value is log det M + mean_k SLQ(Ã, ε_k) from a
    zero start; a warm start (y0 = Lᵀ x0) leaves it unavailable (NaN).
    """
    B, d = z.shape
    K = V.shape[1]
    N = B * K
    E = V.to(ldtype)
    # J u_k is accumulated from the J L⁻ᵀ p of each matvec (J u_{j+1} = J u_j + α_j J L⁻ᵀ p_j),
    # so the detached half of the surrogate costs no extra pass.
    JX = torch.zeros((), dtype=ldtype, device=z.device)
    last_JP: list[Tensor] = []

    # A linearization with gram_mv_hidden keeps its products in a narrower space H (J = W M,
    # returning M p); J u is then lift(M u) once at the end.
    hidden = getattr(lin, "gram_mv_hidden", None)
    lifted = False

    def matvec(P: Tensor) -> Tensor:
        nonlocal lifted
        Q = P.view(B, K, d)
        if prec is not None:
            Q = prec.solve_LT(Q)
        Q = Q.to(z.dtype)
        pair = hidden(Q) if callable(hidden) and (lifted or not last_JP) else None
        if pair is None:
            pair = lin.gram_mv(Q)
        else:
            lifted = True
        JP, AQ = pair
        if not last_JP:
            _check_output_shape(lin.out, z)
        last_JP[:] = [JP]
        AQ = AQ.to(ldtype)
        return (AQ if prec is None else prec.solve_L(AQ)).reshape(N, d)

    def on_step(alpha: Tensor) -> None:
        nonlocal JX
        JX = JX + alpha.view(B, K, 1) * last_JP[0].to(ldtype)

    y0 = None
    if x0 is not None:
        y0 = x0.to(ldtype) if prec is None else prec.apply_LT(x0.to(ldtype))
        y0 = y0.reshape(N, d)
    res = batched_cg(
        matvec,
        E.reshape(N, d),
        tol=tol,
        max_iter=max_iter,
        fixed_iterations=fixed_iterations,
        backend=backend,
        on_step=on_step,
        x0=y0,
    )
    _check_output(lin.out, z)
    Y = res.x.view(B, K, d)
    info.solution = Y if prec is None else prec.solve_LT(Y)
    info.matvecs = res.matvecs
    info.cg_iterations = res.steps.view(B, K)
    info.residuals = res.residuals.view(B, K)
    info.converged = res.converged.view(B, K)
    if res.warm_start:
        quad = torch.full((B, K), float("nan"), dtype=ldtype, device=z.device)
        info.value_available = False
        info.value_unavailable_reason = (
            "warm start: the Lanczos coefficients describe the Krylov space of the initial "
            "residual, not that of the probes, so they give no log det estimate"
        )
        info.singular = res.breakdown.view(B, K).any(1)
    else:
        quad = res.logquad().view(B, K)
        # Breakdown (pᵀAp <= 0) or a Lanczos matrix with a non-positive eigenvalue (NaN
        # quadrature): A is not positive definite on the Krylov space; nothing can be trusted.
        info.singular = (res.breakdown.view(B, K) | ~torch.isfinite(quad)).any(1)
    _report_singular(info.singular, on_singular, "CG met a non-positive curvature")
    if not bool(info.converged.all()):
        warnings.warn(
            "CG reached max_iter before the tolerance for some systems; the gradient estimate "
            "is biased there (see LogdetInfo.residuals with return_info=True)",
            RuntimeWarning,
            stacklevel=4,
        )
    value = quad.mean(1)
    if prec is not None:
        value = value + prec.logdet.to(ldtype)
    value = torch.where(info.singular, torch.full_like(value, float("nan")), value)
    if not need_grad:
        return value, None
    JU = lin.lift(JX.to(z.dtype)) if lifted else JX.to(z.dtype)
    W = V if prec is None else prec.solve_LT(E).to(z.dtype)
    S = (2.0 / K) * _tangent_inner(lin, W, JU)
    return value, S


@torch.compiler.disable
def logdet_grad(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    method: Method = "auto",
    probes: int | Tensor = 1,
    probe_kind: ProbeKind = "rademacher",
    generator: torch.Generator | None = None,
    tol: float = DEFAULT_CG_TOL,
    max_iter: int | None = None,
    fixed_iterations: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
    linalg_dtype: torch.dtype | None = None,
    batching: Batching = "auto",
    on_singular: Literal["jitter", "raise", "nan"] = "jitter",
    preconditioner: str | Tensor | None = None,
    x0: Tensor | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LogdetInfo]:
    """log det(JᵀJ) per sample, with the gradient of log det(JᵀJ) attached.

    J = ∂decoder/∂z is the (D × d) Jacobian of each row. The returned tensor's value is
    log det(JᵀJ) (exact, or the stochastic Lanczos quadrature estimate for CG) and its
    gradient, through ``.backward()``, is the gradient of the full log det(JᵀJ) with respect to
    everything it depends on (the decoder's parameters and z): exact for ``method="exact"``,
    an unbiased Hutchinson estimate (up to the CG tolerance) for ``method="cg"``. For the
    log-likelihood of a rectangular flow use ``-0.5 * logdet_grad(...)``.

    Runs eagerly: under ``torch.compile`` this function is excluded from compilation
    (``torch.compiler.disable``), so a compiled caller gets the same values and gradients.

    Arguments:
        decoder: differentiable callable (function or ``nn.Module``) mapping (B, d) to (B, D),
            d < D, rows independent.
        z: (B, d) latents; may require grad.
        method: ``"exact"`` (forward-mode J with all d tangents batched, Cholesky),
            ``"cg"`` (Hutchinson probes, batched conjugate gradients, SLQ value) or ``"auto"``
            (the measured cost rule of :func:`choose_method`).
        probes: K, the number of probes per sample for CG, or a (B, K, d) tensor of probes
            with E[v vᵀ] = I (deterministic results).
        probe_kind: ``"rademacher"`` (default), ``"gaussian"`` or ``"orthogonal"`` (see
            :func:`rnf_fast.engine.probes.make_probes`). Relative gradient variance
            E‖g - g_exact‖²/‖g_exact‖² on a trained digits flow (d = 10,
            ``bench/results/probes.md``), K = 1 / 4 / 8: Rademacher 0.38 / 0.093 / 0.047,
            Gaussian 0.53 / 0.13 / 0.065, orthogonal 0.42 / 0.070 / 0.012. Rademacher is the
            best single probe (the default K) there and on the standard MLP, and is exact
            when d = 1; with K >= 4 probes prefer ``"orthogonal"`` (needs K <= d).
        generator: torch.Generator for the probes (reproducibility).
        tol: CG relative residual tolerance per system, ‖r‖ <= tol·‖v‖.
        max_iter: CG iteration cap (default d: CG is exact after d steps in exact arithmetic).
        fixed_iterations: run exactly max_iter CG iterations with no host synchronisation
            inside the loop (converged systems are frozen by masks), for CUDA graphs; the
            checks after the loop (finite output, convergence, breakdown) still read flags.
        chunk_size: exact path only: push the d tangents in chunks of this many, recomputing
            each chunk's graph inside backward, so peak memory scales with chunk_size.
        backend: backend of the small ops (:func:`rnf_fast.available_backends`); default: the
            ``use_backend`` setting, else the fastest available for z's device. The Triton
            matvec kernels of the linearizations run only when it resolves to ``"triton"``.
        linalg_dtype: dtype of JᵀJ, Cholesky and CG scalars; default float64 when z is a
            lower precision (cond(JᵀJ) = cond(J)², so float32 Cholesky fails first).
        batching: tangent batching of the generic path: ``"auto"``, ``"vmap"`` or
            ``"repeat"`` (for decoders vmap cannot handle; see
            :class:`rnf_fast.FuncLinearization`).
        on_singular: what to do where JᵀJ is not numerically positive definite (J rank
            deficient to working precision). ``"jitter"`` (default): the exact path retries the
            Cholesky with a bounded jitter (at most 1e3 · eps · tr(A)/d, three tries), warns
            and reports it in ``LogdetInfo.jitter``; samples that still fail, and CG systems
            that meet non-positive curvature, get NaN and a warning. ``"raise"``: raise
            :class:`SingularJacobianError` (no jitter). ``"nan"``: NaN for those samples and a
            warning (no jitter). Samples with a NaN value contribute no gradient (exact path).
        preconditioner: CG only (unused when ``"auto"`` picks exact; an error with
            ``method="exact"``). None (default), ``"jacobi"`` (M = diag(A), d extra tangents
            per sample), ``"batch"`` (one M for all samples: the mean JᵀJ of a few rows), or a
            tensor M: (d, d) or (B, d, d) symmetric positive definite, (d,) or (B, d) a
            positive diagonal. CG then solves L⁻¹ A L⁻ᵀ y = ε (M = L Lᵀ, no gradient through
            M); the gradient stays unbiased and the value is log det M + the quadrature of
            L⁻¹ A L⁻ᵀ, still a correct estimate (:mod:`rnf_fast.engine.precondition`). It pays when
            its cost is below the matvecs it saves (``bench/results/precond.md``).
        x0: CG only, like ``preconditioner``: (B, K, d) initial guess of u_k = A⁻¹ v_k
            (v_k = L ε_k with a preconditioner), for instance ``LogdetInfo.solution`` of an
            earlier call with the same probes (pass them as a tensor) and preconditioner. It
            saves iterations when the decoder changed little; the solution still meets
            ``tol`` and the gradient is unchanged in expectation, but the CG coefficients then
            describe the Krylov space of the initial residual, so there is no log det value:
            it is NaN, and
            ``LogdetInfo.value_available`` is False with the reason. One extra matvec.
        return_info: also return a :class:`LogdetInfo`.

    Returns:
        (B,) tensor, or ``(tensor, LogdetInfo)`` with ``return_info=True``.

    Example:
        >>> import torch, rnf_fast
        >>> dec = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
        >>> z = torch.randn(4, 2, requires_grad=True)
        >>> ld = rnf_fast.logdet_grad(dec, z, method="exact")
        >>> ld.shape
        torch.Size([4])
        >>> ld.sum().backward()
    """
    z = _check_z(z)
    _check_decoder(decoder, z)
    B, d = z.shape
    if method not in ("auto", "exact", "cg"):
        raise ValueError(f"method must be 'auto', 'exact' or 'cg', got {method!r}")
    if probe_kind not in PROBE_KINDS:
        raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {probe_kind!r}")
    if on_singular not in ("jitter", "raise", "nan"):
        raise ValueError(f"on_singular must be 'jitter', 'raise' or 'nan', got {on_singular!r}")
    if not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if chunk_size is not None:
        _check_positive_int("chunk_size", chunk_size)
    max_iter = d if max_iter is None else _check_positive_int("max_iter", max_iter)
    K = _check_probes(probes, z)
    check_preconditioner(preconditioner, B, d)
    _check_x0(x0, z, K)
    if method == "exact" and (preconditioner is not None or x0 is not None):
        name = "preconditioner" if preconditioner is not None else "x0"
        raise ValueError(f"{name} applies to method='cg' only, got method='exact'")
    ldtype = _linalg_dtype(z, linalg_dtype)
    backend_name, ops = get_backend(backend, z.device)
    # The Triton matvec kernels run only under the "triton" backend: "torch" and "cpp" mean
    # no Triton anywhere in the call.
    with allow_triton(backend_name == "triton"):
        lin = linearize(decoder, z, batching=batching)
        if method == "auto":
            path = "explicit" if getattr(lin, "batching", None) == "explicit" else "generic"
            method = choose_method(d, K, path=path)
        need_grad = torch.is_grad_enabled()
        info = LogdetInfo(
            method=method,
            backend=backend_name,
            batching="",
            fallback_reason=None,
            linalg_dtype=ldtype,
            probes=d if method == "exact" else K,
        )
        if method == "exact":
            value, S = _exact(lin, z, ops, ldtype, chunk_size, need_grad, on_singular, info)
        else:
            V = _draw_probes(probes, z, probe_kind, generator)
            prec = None
            if preconditioner is not None:
                prec = build_preconditioner(
                    preconditioner, decoder, lin, z, dtype=ldtype, batching=batching
                )
                info.preconditioner = prec.kind
            value, S = _cg(
                lin,
                z,
                backend_name,
                ldtype,
                V,
                float(tol),
                max_iter,
                fixed_iterations,
                need_grad,
                on_singular,
                info,
                prec,
                x0,
            )
        info.batching = getattr(lin, "batching", type(lin).__name__)
        info.fallback_reason = getattr(lin, "fallback_reason", None)
        value = value.to(z.dtype)
        out = value if S is None or not S.requires_grad else value + (S - S.detach())
        return (out, info) if return_info else out


def logdet(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    method: Method = "exact",
    probes: int | Tensor = 1,
    probe_kind: ProbeKind = "rademacher",
    generator: torch.Generator | None = None,
    tol: float = DEFAULT_CG_TOL,
    max_iter: int | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    linalg_dtype: torch.dtype | None = None,
    batching: Batching = "auto",
    on_singular: Literal["jitter", "raise", "nan"] = "jitter",
    preconditioner: str | Tensor | None = None,
) -> Tensor:
    """log det(JᵀJ) per sample, value only (no graph), for evaluation.

    Same arguments as :func:`logdet_grad`; the default method is exact. With ``method="cg"``
    the value is the stochastic Lanczos quadrature estimate.

    Returns:
        (B,) detached tensor.
    """
    with torch.no_grad():
        return logdet_grad(
            decoder,
            z,
            method=method,
            probes=probes,
            probe_kind=probe_kind,
            generator=generator,
            tol=tol,
            max_iter=max_iter,
            chunk_size=chunk_size,
            backend=backend,
            linalg_dtype=linalg_dtype,
            batching=batching,
            on_singular=on_singular,
            preconditioner=preconditioner,
        )
