"""log det(JᵀJ) of a decoder with its gradient (:func:`logdet_grad`), or its value (:func:`logdet`).

Both share one argument handling: the method and its options (:mod:`.options`: the flat
keywords mapped onto ``Exact`` and ``CG``), the checks (:mod:`.checks`), the backend and the
linearization; then :func:`.auto.choose_method` (or, opted in, the timings of a
:class:`.calibrate.Calibrator`) picks a method for ``"auto"``, the estimator of :mod:`.exact` or
:mod:`.stochastic` runs, and the value and surrogate are joined as
``value.detach() + (S - S.detach())`` (:mod:`.estimator`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..linearize.base import Batching, linearize
from ..ops.dispatch import Backend, get_backend, use_backend
from .auto import choose_method, predicted_costs
from .calibrate import AutoDecision, Calibrator, Plan, calibration_key, resolve_calibrator
from .checks import (
    OnSingular,
    SingularJacobianError,
    check_cg_against,
    check_decoder,
    check_decoder_call,
    check_on_singular,
    check_z,
    linalg_dtype_for,
)
from .estimator import Context, Estimate
from .exact import ExactInfo, estimate_exact
from .graph_cg import check_cuda_graph
from .options import DEFAULT_CG_TOL, Method, ResolvedOptions, resolve_options
from .precision import CallerAutocast, accumulate_dtype, engine_region
from .probes import ProbeKind
from .stochastic import CGInfo, estimate_cg
from .truncation import Roulette

__all__ = [
    "DEFAULT_CG_TOL",
    "LogdetInfo",
    "Method",
    "SingularJacobianError",
    "logdet",
    "logdet_grad",
]


@dataclass
class LogdetInfo:
    """What a call to :func:`logdet_grad` did: common fields, and one part per method.

    Attributes:
        method: the method that ran, ``"exact"`` or ``"cg"``.
        path: how ``"auto"`` costed the decoder's linearization: ``"explicit"`` or ``"generic"``
            (its ``path`` attribute).
        backend: the backend of the small ops.
        batching: how tangents were batched (``"vmap"`` or ``"repeat"``, or the decoder's own
            linearization's name for it, e.g. ``"explicit"``).
        fallback_reason: why the linearization took a slower way (vmap failed, a layer without
            a rule), if it did.
        linalg_dtype: dtype of JᵀJ, the Cholesky factor and the CG state.
        probes: K (d for the exact path).
        singular: (B,) samples whose JᵀJ is numerically singular: J rank deficient to the
            precision of the decoder's products (see ``on_singular`` of :func:`logdet_grad`). Their
            value is NaN, except under ``on_singular="jitter"`` where those that factor keep
            theirs.
        value_available: False when the returned value is not an estimate of log det A (it is
            then NaN; the gradient is still right).
        value_unavailable_reason: why, when ``value_available`` is False.
        unused_options: the options set for the method that did not run: those of CG when
            ``method="auto"`` picked exact (or a ``generator`` given to the exact method),
            ``chunk_size`` when it picked CG.
        auto_decision: how ``method="auto"`` chose (None for another method): an
            :class:`~rnf_fast.engine.calibrate.AutoDecision` whose ``source`` is ``"model"``
            (the fitted cost model; ``exact_ms``/``cg_ms`` its predictions),
            ``"calibrating"`` (a timed call of a key being calibrated) or ``"calibrated"``
            (``exact_ms``/``cg_ms`` the measured medians); see ``auto_calibrate`` of
            :func:`logdet_grad`.
        exact: the exact path's report (:class:`~rnf_fast.engine.exact.ExactInfo`: ``gram``,
            ``jitter``, ``chunk_size``), or None.
        cg: the CG path's report (:class:`~rnf_fast.engine.stochastic.CGInfo`: ``matvecs``,
            ``iterations``, ``residuals``, ``converged``, ``preconditioner``, ``solution``,
            ``graph``: how a CUDA-graph solve ran, or why it did not), or None.
        output: (B, D) decoder(z) with its graph, where the linearization ran the decoder with
            grad enabled and kept it (the explicit linearizations of ``nn.Sequential`` MLPs and
            of the flow decoders do; its graph is the one the log det's gradient flows
            through), else None. A loss that needs decoder(z) as well (a reconstruction term)
            can use it instead of running the decoder again: the ML loss does. An MLP's final
            Linear (not needed by the log det) runs on first access, under the autocast of the
            call.
        output_from: the linearization ``output`` is read from (it keeps its factors alive
            as long as this report).
    """

    method: Literal["exact", "cg"]
    path: str
    backend: str
    batching: str
    fallback_reason: str | None
    linalg_dtype: torch.dtype
    probes: int
    singular: Tensor
    value_available: bool = True
    value_unavailable_reason: str | None = None
    unused_options: tuple[str, ...] = ()
    auto_decision: AutoDecision | None = None
    exact: ExactInfo | None = None
    cg: CGInfo | None = None
    output_from: object = field(default=None, repr=False, compare=False)

    @property
    def output(self) -> Tensor | None:
        """decoder(z) with its graph, or None (see the class docstring); a linearization that
        skipped a final layer the log det does not need runs it now, once."""
        return getattr(self.output_from, "output", None)


def _run(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    method: Method,
    flat: dict[str, object],
    *,
    backend: str | None,
    linalg_dtype: torch.dtype | None,
    batching: Batching,
    on_singular: OnSingular,
    auto_calibrate: bool | Calibrator | None = None,
) -> tuple[Tensor, LogdetInfo]:
    """The shared body of :func:`logdet_grad` and :func:`logdet`: checks, method choice, the
    estimator, and the value joined with the surrogate's gradient."""
    z = check_z(z)
    check_decoder(decoder, z)
    options = resolve_options(method, flat)
    calibrator = resolve_calibrator(auto_calibrate, method)
    check_on_singular(on_singular)
    if options.cg is not None:
        check_cg_against(options.cg, z)
        check_cuda_graph(options.cg.cuda_graph, z)
    ldtype = linalg_dtype_for(z, linalg_dtype)
    backend_name, ops = get_backend(backend, z.device)
    try:
        return _estimate(
            decoder, z, options, backend_name, ops, ldtype, batching, on_singular, calibrator
        )
    except (SingularJacobianError, Warning):
        raise
    except Exception as error:
        # A decoder that rejects z or returns no tensor fails deep inside torch.func or vmap:
        # one plain call on z tells that apart and says so; any other error passes unchanged.
        check_decoder_call(decoder, z, error)
        raise


def _estimate(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    options: ResolvedOptions,
    backend_name: str,
    ops: Backend,
    ldtype: torch.dtype,
    batching: Batching,
    on_singular: OnSingular,
    calibrator: Calibrator | None,
) -> tuple[Tensor, LogdetInfo]:
    """The linearization, the method choice and the estimator of :func:`_run`."""
    B, d = z.shape
    # The decoder's products run under the caller's autocast (if any); the engine's own
    # arithmetic (Gram, Cholesky, CG, SLQ, the surrogate's sums) never does: see .precision.
    caller = CallerAutocast.capture(z.device.type)
    plan: Plan | None = None
    if calibrator is not None:
        # Planned (and, while the key calibrates, timed) from before the linearization on: the
        # decoder's primal is part of either method's cost.
        key = calibration_key(
            decoder,
            z,
            options,
            batching=batching,
            grad=torch.is_grad_enabled(),
            autocast=caller.applies_to(z.dtype),
        )
        plan = calibrator.plan(key, z.device)
    # The linearizations' matvec ops follow the resolved backend: the Triton kernels run only
    # under "triton" and "cupy" (whose base it is); "torch" and "cpp" mean no Triton anywhere.
    with use_backend(backend_name), engine_region(z.device.type):
        with caller.active():
            inner = linearize(decoder, z, batching=batching)
        lin = caller.wrap(inner)
        path = getattr(inner, "path", "generic")
        chosen, decision = _choose(options, d, path, plan)
        ctx = Context(
            decoder=decoder,
            lin=lin,
            z=z,
            backend=backend_name,
            ops=ops,
            linalg_dtype=ldtype,
            need_grad=torch.is_grad_enabled(),
            on_singular=on_singular,
            batching=batching,
            autocast=caller.applies_to(z.dtype),
        )
        part: ExactInfo | CGInfo
        estimate: Estimate
        if chosen == "exact":
            estimate, part = estimate_exact(options.exact, ctx)
        else:
            estimate, part = estimate_cg(options.cg, ctx)
        info = LogdetInfo(
            method=chosen,
            path=path,
            backend=backend_name,
            # Read after the estimator: a generic linearization settles its batching on use.
            batching=getattr(inner, "batching", None) or type(inner).__name__,
            fallback_reason=getattr(inner, "fallback_reason", None),
            linalg_dtype=ldtype,
            probes=d if chosen == "exact" else options.cg.K,
            singular=estimate.singular,
            value_available=estimate.value_unavailable_reason is None,
            value_unavailable_reason=estimate.value_unavailable_reason,
            unused_options=options.unused(chosen),
            auto_decision=decision,
            exact=part if chosen == "exact" else None,
            cg=part if chosen == "cg" else None,
            output_from=lin,
        )
        value = estimate.value.to(accumulate_dtype(z.dtype))
        S = estimate.surrogate
        if S is not None and S.requires_grad:
            value = value + (S - S.detach()).to(value.dtype)
        if plan is not None:
            plan.finish(value)
        return value, info


def _choose(
    options: ResolvedOptions, d: int, path: str, plan: Plan | None
) -> tuple[Literal["exact", "cg"], AutoDecision | None]:
    """The method a call runs, and how ``"auto"`` chose it (None for a given method)."""
    if options.method != "auto":
        return options.method, None
    if plan is not None:
        return plan.method, plan.decision
    exact_ms, cg_ms = predicted_costs(d, options.cg.K, path=path)
    return choose_method(d, options.cg.K, path=path), AutoDecision("model", exact_ms, cg_ms)


def _eager_only(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, applied only once torch._dynamo is loaded: importing it
    takes about a second, as long as torch itself, and nobody compiles without loading it.

    The wrapper carries dynamo's own mark of a disabled function, so a compiled caller stops
    its graph at the call instead of tracing in; the call then runs through the disabled ``fn``
    (no frame of it is compiled). Without dynamo loaded nothing can be compiling: ``fn`` runs.
    """

    @functools.cache
    def disabled() -> Callable:
        return torch.compiler.disable(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        return disabled()(*args, **kwargs)

    wrapper._torchdynamo_disable = True  # read with inspect.getattr_static by dynamo
    return wrapper


@_eager_only
def logdet_grad(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    method: Method = "auto",
    *,
    probes: int | Tensor = 1,
    probe_kind: ProbeKind = "rademacher",
    generator: torch.Generator | None = None,
    tol: float = DEFAULT_CG_TOL,
    max_iter: int | None = None,
    fixed_iterations: bool = False,
    preconditioner: str | Tensor | None = None,
    x0: Tensor | None = None,
    truncation: Roulette | None = None,
    cuda_graph: bool | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    linalg_dtype: torch.dtype | None = None,
    batching: Batching = "auto",
    on_singular: OnSingular = "jitter",
    auto_calibrate: bool | Calibrator | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, LogdetInfo]:
    """log det(JᵀJ) per sample, with the gradient of log det(JᵀJ) attached.

    J = ∂decoder/∂z is the (D × d) Jacobian of each row. The returned tensor's value is
    log det(JᵀJ) (exact, or the stochastic Lanczos quadrature estimate for CG) and its
    gradient, through ``.backward()``, is the gradient of the full log det(JᵀJ) with respect to
    everything it depends on (the decoder's parameters and z): exact for the exact method, an
    unbiased Hutchinson estimate (up to the CG tolerance) for CG. For the log-likelihood of a
    rectangular flow use ``-0.5 * logdet_grad(...)``.

    Runs eagerly: under ``torch.compile`` this function is excluded from compilation
    (``torch.compiler.disable``), so a compiled caller gets the same values and gradients.

    Precision (bf16/fp16 decoders, ``torch.autocast``): the decoder runs as the caller runs it,
    in its own dtype and under the caller's autocast if one is active, so J v and Jᵀ w come in
    its compute dtype (bf16 for ``decoder.to(torch.bfloat16)``, or for a float32 decoder's GEMMs
    under ``torch.autocast(..., dtype=torch.bfloat16)``). Everything computed from them runs with
    autocast switched off and never in 16 bits: JᵀJ, its Cholesky factor, the CG state and the
    Lanczos value in ``linalg_dtype``; A⁻¹Jᵀ and the surrogate's sums in float32 at least
    (16-bit tangents are cast up in blocks before any reduction; CG directions enter 16-bit
    products at unit scale, so fp16's range does not truncate them). The value is float32 for a
    bf16 or fp16 z, else z's dtype; gradients reach z and the parameters in their own dtypes.
    The error is then that of J's rounding: within 2γ u κ_F(J) of the float64 truth per sample,
    u the unit roundoff (2⁻⁸ bf16, 2⁻¹¹ fp16), γ the 16-bit roundings on a tangent's path
    (about two per layer), κ_F(J) = ‖J‖_F ‖J⁺‖_F; the gradient's relative error likewise
    (``tests/test_mixed_precision.py``: measured at most 2.3 u κ_F against bounds of 8 and 16).
    16-bit products lose CG's orthogonality: an ill-conditioned system may need more than d
    iterations to meet ``tol`` (it stops at ``max_iter`` with a warning). See
    :mod:`rnf_fast.engine.precision`.

    Arguments:
        decoder: differentiable callable (function or ``nn.Module``) mapping (B, d) to a (B, D)
            tensor, d < D, rows independent and deterministic. A module with a layer that is
            random or couples the rows (Dropout with p > 0 or BatchNorm in training mode,
            InstanceNorm with running statistics in training mode, BatchNorm without running
            statistics: :data:`rnf_fast.engine.checks.NONDETERMINISTIC_LAYERS`) is a
            ``ValueError`` before any work: call ``decoder.eval()`` first. (Randomness in a
            function or a functional ``F.dropout`` cannot be seen and gives an undefined result.)
        z: (B, d) latents; may require grad.
        method: ``"exact"`` or :class:`~rnf_fast.Exact` (forward-mode J with all d tangents
            batched, Cholesky), ``"cg"`` or :class:`~rnf_fast.CG` (Hutchinson probes, batched
            conjugate gradients, SLQ value), or ``"auto"`` (default: the cheaper of the two
            under the measured cost rule of :func:`rnf_fast.choose_method`, with K from
            ``probes``). A method's options live in its object: ``CG(probes=4, tol=1e-3)``,
            ``Exact(chunk_size=8)``.
        probes, probe_kind, generator, tol, max_iter, fixed_iterations, preconditioner, x0,
            truncation, cuda_graph: the fields of :class:`~rnf_fast.CG` as flat keywords (see
            it for each).
        chunk_size: the field of :class:`~rnf_fast.Exact`, as a flat keyword.
        backend: backend of the small ops (:func:`rnf_fast.available_backends`); default: the
            ``use_backend`` setting, else the fastest available for z's device. The Triton
            matvec kernels of the linearizations run only when it resolves to ``"triton"`` or
            ``"cupy"``.
        linalg_dtype: dtype of JᵀJ, Cholesky, the CG state and the Lanczos value:
            ``torch.float32`` or ``torch.float64`` (a 16-bit type is a ``ValueError``); default
            float64 when z is a lower precision (cond(JᵀJ) = cond(J)², so float32 Cholesky
            fails first).
        batching: tangent batching of the generic path: ``"auto"``, ``"vmap"`` or
            ``"repeat"`` (for decoders vmap cannot handle; see
            :class:`rnf_fast.FuncLinearization`).
        on_singular: what to do where JᵀJ is numerically singular: J rank deficient to the
            precision of the decoder's products (float32 for a float32 decoder, although A is
            factored in float64; bf16 for a bf16 decoder or under a bf16 autocast). The exact
            path flags a sample whose Cholesky fails, needs jitter, or has a scaled pivot
            l_i²/A_ii below max((c eps_J)², 100 eps_A), c = 100 (10 for 16-bit products)
            (:func:`~rnf_fast.engine.checks.pivot_floor`: only κ(J) > 8.4e4 in float32, 12.8 in
            bf16, can be flagged); CG flags a breakdown or a Ritz ratio θ_min/θ_max below 3 eps
            of the products' dtype ((10 eps)² for 16-bit products;
            :func:`~rnf_fast.engine.checks.ritz_floor`: κ(J) > 1.7e3 in float32, 12.8 in bf16,
            where it is a screen, not a proof).
            ``"jitter"`` (default): one warning per call, counting the samples; the exact path
            retries a failed Cholesky with a bounded jitter (at most 1e3 · eps · tr(A)/d, three
            tries, in ``LogdetInfo.exact.jitter``); samples that still fail, and CG systems that
            break down, get NaN; the others keep their (rounding-dominated) value.
            ``"raise"``: raise :class:`SingularJacobianError` (no jitter). ``"nan"``: NaN for
            every flagged sample and a warning (no jitter). Samples with a NaN value contribute
            no gradient (exact path). ``LogdetInfo.singular`` marks the flagged samples.
        auto_calibrate: ``method="auto"`` decided by timing both methods on this device
            (:mod:`rnf_fast.engine.calibrate`) instead of the fitted CPU cost model: the first
            calls for a key (the decoder's parameter shapes, B, d, K, z's dtype and device, ...)
            run exact and CG in turn, each timed with its backward; then the faster one runs.
            None (default): off, unless the environment variable
            ``RNF_FAST_AUTO_CALIBRATE=1`` (read at each call) switches it on; False: off; True:
            on, with the process-wide decisions (``calibration_state()`` of
            :mod:`rnf_fast.engine.calibrate` exports them, ``load_calibration_state`` restores
            them); a :class:`~rnf_fast.engine.calibrate.Calibrator`: on, with its decisions.
            With another method than ``"auto"``, True or a calibrator is a ``ValueError``.
            ``LogdetInfo.auto_decision`` says how each call chose.
        return_info: also return a :class:`LogdetInfo`.

    A flat keyword left at its default is not set. One that is set must apply: an option of
    the other method (``chunk_size`` with ``"cg"``, ``tol`` with ``"exact"``), an option
    given both in an object and as a keyword, ``probe_kind`` or ``generator`` with a probe
    tensor: each is a ``ValueError`` naming it. ``"auto"`` takes the options of both methods
    and lists those of the method it did not pick in ``LogdetInfo.unused_options``; so does
    the exact method for a ``generator`` (it draws nothing), so that a caller can pass one
    source of randomness whatever the method.

    A bad decoder is named before a deep torch error: one that returns no tensor is a
    ``TypeError`` saying what it returned, one that fails on z a ``ValueError`` saying it
    failed on z of shape (B, d) (its own error chained), one whose output does not depend on z
    (J = 0 at every sample) a ``ValueError`` saying so. CG probes whose buffers would take more
    than half of the available memory (:func:`~rnf_fast.engine.checks.check_cg_memory`) are a
    ``ValueError`` naming ``probes`` and the size, before anything is allocated.

    Returns:
        (B,) tensor (float32 for a 16-bit z), or ``(tensor, LogdetInfo)`` with
        ``return_info=True``.

    Example:
        >>> import torch, rnf_fast
        >>> dec = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
        >>> z = torch.randn(4, 2, requires_grad=True)
        >>> ld = rnf_fast.logdet_grad(dec, z, "exact")
        >>> ld.shape
        torch.Size([4])
        >>> ld.sum().backward()
        >>> ld, info = rnf_fast.logdet_grad(dec, z, rnf_fast.CG(probes=2), return_info=True)
        >>> info.method, info.cg.iterations.shape
        ('cg', torch.Size([4, 2]))
        >>> rnf_fast.logdet_grad(dec, z, "cg", chunk_size=1)
        Traceback (most recent call last):
        ...
        ValueError: chunk_size applies to method='exact' (or 'auto') only, got method='cg'
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 GEMMs, float64 Cholesky
        ...     ld = rnf_fast.logdet_grad(dec, z, "exact")
        >>> ld.dtype, rnf_fast.logdet_grad(dec.to(torch.bfloat16), z.bfloat16()).dtype
        (torch.float32, torch.float32)
    """
    flat = {
        "chunk_size": chunk_size,
        "probes": probes,
        "probe_kind": probe_kind,
        "generator": generator,
        "tol": tol,
        "max_iter": max_iter,
        "fixed_iterations": fixed_iterations,
        "preconditioner": preconditioner,
        "x0": x0,
        "truncation": truncation,
        "cuda_graph": cuda_graph,
    }
    value, info = _run(
        decoder,
        z,
        method,
        flat,
        backend=backend,
        linalg_dtype=linalg_dtype,
        batching=batching,
        on_singular=on_singular,
        auto_calibrate=auto_calibrate,
    )
    return (value, info) if return_info else value


def logdet(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    method: Method = "exact",
    *,
    probes: int | Tensor = 1,
    probe_kind: ProbeKind = "rademacher",
    generator: torch.Generator | None = None,
    tol: float = DEFAULT_CG_TOL,
    max_iter: int | None = None,
    fixed_iterations: bool = False,
    preconditioner: str | Tensor | None = None,
    x0: Tensor | None = None,
    truncation: Roulette | None = None,
    cuda_graph: bool | None = None,
    chunk_size: int | None = None,
    backend: str | None = None,
    linalg_dtype: torch.dtype | None = None,
    batching: Batching = "auto",
    on_singular: OnSingular = "jitter",
    auto_calibrate: bool | Calibrator | None = None,
) -> Tensor:
    """log det(JᵀJ) per sample, value only (no graph), for evaluation.

    :func:`logdet_grad` under ``torch.no_grad()``: the same arguments but ``return_info``, and
    the default method is ``"exact"``, so the value is exact unless another method is asked
    for (with ``"cg"`` it is the stochastic Lanczos quadrature estimate).

    Returns:
        (B,) detached tensor.

    Example:
        >>> import torch, rnf_fast
        >>> dec = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5))
        >>> rnf_fast.logdet(dec, torch.randn(4, 2)).requires_grad
        False
    """
    with torch.no_grad():
        return logdet_grad(
            decoder,
            z,
            method,
            probes=probes,
            probe_kind=probe_kind,
            generator=generator,
            tol=tol,
            max_iter=max_iter,
            fixed_iterations=fixed_iterations,
            preconditioner=preconditioner,
            x0=x0,
            truncation=truncation,
            cuda_graph=cuda_graph,
            chunk_size=chunk_size,
            backend=backend,
            linalg_dtype=linalg_dtype,
            batching=batching,
            on_singular=on_singular,
            auto_calibrate=auto_calibrate,
        )
