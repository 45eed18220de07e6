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

from .backends import get_backend
from .cg import batched_cg
from .linop import Batching, Linearization, linearize
from .probes import PROBE_KINDS, ProbeKind, make_probes

__all__ = [
    "AUTO_CG_PROBE_EXPONENT",
    "AUTO_EXACT_OVER_CG1",
    "DEFAULT_CG_TOL",
    "LogdetInfo",
    "SingularJacobianError",
    "choose_method",
    "logdet",
    "logdet_grad",
]

Method = Literal["auto", "exact", "cg"]

DEFAULT_CG_TOL = 1e-2
"""Default relative residual tolerance of CG. Measured on the standard MLP problem with K = 1
(``bench/study_cg_tol.py``): the CG error of the gradient at 1e-2 is 0.5% of the gradient and
250x below the Hutchinson noise, in 7.3 iterations against 11.1 at 1e-4."""

# Time of one exact step over one CG step with K = 1, against d, for each linearization path:
# the MLP decoder d -> 256 -> 256 -> 784, B = 64, float32, 2 CPU cores (bench/study_auto.py,
# README). Above 1, CG is faster.
AUTO_EXACT_OVER_CG1: dict[str, tuple[tuple[int, float], ...]] = {
    "explicit": (
        (4, 0.97),
        (8, 1.12),
        (16, 1.61),
        (32, 2.01),
        (64, 3.09),
        (128, 1.97),
        (256, 1.18),
    ),
    "generic": ((4, 0.40), (8, 0.40), (16, 0.49), (32, 0.71), (64, 0.88), (128, 0.63), (256, 0.51)),
}
# CG's cost grows with the probes as K^0.5 (K = 4 cost 1.5-3.3x K = 1 in the same study,
# median 2.0).
AUTO_CG_PROBE_EXPONENT = 0.5


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


def choose_method(d: int, K: int, *, path: str = "generic") -> str:
    """The ``method="auto"`` rule, from measured costs: the cheaper of exact and CG.

    The exact path costs one primal and d tangents pushed together, then a d×d Cholesky; CG
    costs, per iteration, a JVP and a VJP for K probes, plus K differentiable tangents, and
    needs more iterations as d (and the conditioning) grows. ``AUTO_EXACT_OVER_CG1`` holds the
    measured time ratio exact / CG(K=1) against d for each linearization path; the ratio is
    interpolated in log d (clamped outside the measured range) and CG is chosen when it exceeds
    K^``AUTO_CG_PROBE_EXPONENT`` (K^0.5), the measured growth of CG's cost with K. On the generic
    ``torch.func`` path (every matvec re-runs the primal) exact wins at every measured d; on the
    explicit MLP path CG with K = 1 wins from d = 8 up, CG with K = 4 around d = 32-64.

    Arguments:
        d: latent dimension.
        K: probes per sample the stochastic path would use.
        path: ``"explicit"`` (a linearization with cached factors) or ``"generic"``.

    Returns:
        ``"exact"`` or ``"cg"``.
    """
    if path not in AUTO_EXACT_OVER_CG1:
        raise ValueError(f"path must be one of {sorted(AUTO_EXACT_OVER_CG1)}, got {path!r}")
    table = AUTO_EXACT_OVER_CG1[path]
    x = math.log2(min(max(d, table[0][0]), table[-1][0]))
    for (d0, r0), (d1, r1) in zip(table, table[1:]):
        if x <= math.log2(d1):
            t = (x - math.log2(d0)) / (math.log2(d1) - math.log2(d0))
            ratio = r0 + t * (r1 - r0)
            break
    return "cg" if ratio > K**AUTO_CG_PROBE_EXPONENT else "exact"


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


def _check_output(out: Tensor, z: Tensor) -> None:
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


def _exact(lin, z, ops, ldtype, chunk_size, need_grad, on_singular, info):
    B, d = z.shape
    E = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)  # row k is e_k
    c = d if chunk_size is None else min(chunk_size, d)
    starts = range(0, d, c)
    if need_grad and c == d:
        JT = lin.jvp(E, create_graph=True)  # (B, d, D): JT[:, k] = J e_k
    else:
        JT = torch.cat([lin.jvp(E[:, s : s + c]) for s in starts], dim=1)
    _check_output(lin.out, z)
    steps = ops.JITTER_STEPS if on_singular == "jitter" else ()
    A = _gram(ops, JT.detach(), ldtype)
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
            stacklevel=4,
        )
    if not need_grad:
        return value, None
    # Rows of A⁻¹Jᵀ are the columns of J A⁻¹ (A symmetric), the detached half of S. A d×d
    # inverse then one GEMM in the model's dtype is ~2.5x cheaper than a (d, D) triangular solve.
    # Singular samples (NaN value) get an identity factor and a zero W: no gradient from them.
    singular = info.singular
    if bool(singular.any()):
        L = torch.where(singular[:, None, None], torch.eye(d, dtype=L.dtype, device=L.device), L)
    WT = ops.cholesky_inverse(L).to(z.dtype) @ JT.detach()
    WT = torch.where(singular[:, None, None], torch.zeros_like(WT), WT)
    if c == d:
        S = 2.0 * (WT * JT).sum((1, 2))
    else:
        # Each chunk's graph is rebuilt inside backward: peak memory scales with chunk_size.
        S = 2.0 * sum(
            checkpoint(_tangent_inner, lin, E[:, s : s + c], WT[:, s : s + c], use_reentrant=False)
            for s in starts
        )
    return value, S


def _cg(lin, z, backend, ldtype, V, tol, max_iter, fixed_iterations, need_grad, on_singular, info):
    B, d = z.shape
    K = V.shape[1]
    N = B * K
    # J u_k is accumulated from the J p of each matvec (J x_{j+1} = J x_j + α_j J p_j), so the
    # detached half of the surrogate costs no extra pass.
    JX = torch.zeros((), dtype=ldtype, device=z.device)
    last_JP: list[Tensor] = []

    def matvec(P: Tensor) -> Tensor:
        JP, AP = lin.gram_mv(P.view(B, K, d).to(z.dtype))
        if not last_JP:
            _check_output(lin.out, z)
        last_JP[:] = [JP]
        return AP.reshape(N, d).to(ldtype)

    def on_step(alpha: Tensor) -> None:
        nonlocal JX
        JX = JX + alpha.view(B, K, 1) * last_JP[0].to(ldtype)

    res = batched_cg(
        matvec,
        V.to(ldtype).reshape(N, d),
        tol=tol,
        max_iter=max_iter,
        fixed_iterations=fixed_iterations,
        backend=backend,
        on_step=on_step,
    )
    info.matvecs = res.matvecs
    info.cg_iterations = res.steps.view(B, K)
    info.residuals = res.residuals.view(B, K)
    info.converged = res.converged.view(B, K)
    quad = res.logquad().view(B, K)
    # Breakdown (pᵀAp <= 0) or a Lanczos matrix with a non-positive eigenvalue (NaN quadrature):
    # A is not positive definite on the Krylov space, so neither value nor solve can be trusted.
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
    value = torch.where(info.singular, torch.full_like(value, float("nan")), value)
    if not need_grad:
        return value, None
    S = (2.0 / K) * _tangent_inner(lin, V, JX.to(z.dtype))
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
            :func:`rnf_fast.probes.make_probes`). Rademacher probes gave the lowest single-probe
            gradient noise on the standard problem (``bench/study_probes.py``: 1.07 against
            1.16 for Gaussian, relative to the gradient) and are exact when d = 1.
        generator: torch.Generator for the probes (reproducibility).
        tol: CG relative residual tolerance per system, ‖r‖ <= tol·‖v‖.
        max_iter: CG iteration cap (default d: CG is exact after d steps in exact arithmetic).
        fixed_iterations: run exactly max_iter CG iterations with no host synchronisation
            (converged systems are frozen), for CUDA graphs.
        chunk_size: exact path only: push the d tangents in chunks of this many, recomputing
            each chunk's graph inside backward, so peak memory scales with chunk_size.
        backend: backend of the small ops (:func:`rnf_fast.available_backends`); default: the
            ``use_backend`` setting, else the fastest available for z's device.
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
    ldtype = _linalg_dtype(z, linalg_dtype)
    backend_name, ops = get_backend(backend, z.device)
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
        )
