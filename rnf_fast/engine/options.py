"""The options of each log-det method as objects, and the mapping of the flat keywords onto them.

:class:`Exact` and :class:`CG` hold the options of one method each, so an option of the other
method cannot be written into a call: ``logdet_grad(decoder, z, CG(probes=4, tol=1e-3))``.
Each validates its fields when built (shape checks against z come later, in the call).

The flat keywords of :func:`rnf_fast.logdet_grad` (``probes=``, ``tol=``, ``chunk_size=``, ...)
stay accepted and are mapped onto these objects by :func:`resolve_options`. A flat keyword left
at its default is not set; one that is set must apply to the method: an option of the other
method, or an option given both in an object and as a keyword, is a ``ValueError`` naming it.
``method="auto"`` takes the options of both methods and reports those of the method it did not
pick in ``LogdetInfo.unused_options``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
from torch import Tensor

from .precondition import check_preconditioner
from .probes import PROBE_KINDS, ProbeKind
from .truncation import Roulette

__all__ = [
    "CG",
    "CG_OPTIONS",
    "DEFAULT_CG_TOL",
    "EXACT_OPTIONS",
    "Exact",
    "Method",
    "MethodName",
    "ResolvedOptions",
    "resolve_options",
]

MethodName = Literal["auto", "exact", "cg"]

DEFAULT_CG_TOL = 1e-2
"""Default relative residual tolerance of CG, from two studies. Bias against noise on the standard
MLP problem with one Rademacher probe (``bench/study_cg_tol.py``, 512 probe draws): at 1e-2 the
mean gradient's bias is 0.10% of the gradient in 9.0 matvecs, at 1e-1 1.1% in 6.4, with 3 fixed
iterations 9.3%; the Hutchinson noise is 108% per step and averages out, the bias does not.
Whole training runs (``bench/study_tolerance.py``): on the MNIST preset a cap of 3 iterations
ends 0.09 nats worse than 1e-2 (paired over seeds), 1e-1 ends level but still takes 20
matvecs there (the slowest system never meets it within d); on digits every rule ends level.
A looser tolerance buys little and costs bias; randomized truncation
(:class:`~rnf_fast.engine.truncation.Roulette`) is the unbiased way to fewer iterations."""


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _describe(value: object) -> str:
    """A short repr: tensors by shape and dtype, not by their entries."""
    if isinstance(value, Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    if isinstance(value, torch.Generator):
        return f"<generator on {value.device}>"
    return repr(value)


class _Options:
    """Shared by the option objects: a repr of the fields that differ from their defaults."""

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={_describe(getattr(self, f.name))}"
            for f in fields(self)
            if not _is_default(f.default, getattr(self, f.name))
        ]
        return f"{type(self).__name__}({', '.join(changed)})"


@dataclass(frozen=True, repr=False)
class Exact(_Options):
    """Options of the exact method: J from d forward-mode tangents, A = JᵀJ, Cholesky.

    The value is exact and so is the gradient (to rounding).

    Arguments:
        chunk_size: push the d tangents ``chunk_size`` at a time and rebuild each chunk's graph
            inside backward (non-reentrant checkpointing), so peak memory scales with
            ``chunk_size`` instead of d; None (default): all d at once.

    Example:
        >>> from rnf_fast import Exact
        >>> Exact(chunk_size=16)
        Exact(chunk_size=16)
        >>> Exact(chunk_size=0)
        Traceback (most recent call last):
        ...
        ValueError: chunk_size must be a positive integer, got 0
    """

    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_size is not None:
            _check_positive_int("chunk_size", self.chunk_size)


@dataclass(frozen=True, eq=False, repr=False)
class CG(_Options):
    """Options of the stochastic method: Hutchinson probes, batched conjugate gradients, and the
    stochastic Lanczos quadrature value of the same CG run.

    The gradient is an unbiased estimate (up to the CG tolerance) of the gradient of
    log det(JᵀJ); the value is an estimate of log det(JᵀJ) (exact when the K probes span R^d
    orthogonally and CG runs d steps).

    Arguments:
        probes: K, the number of probes per sample, or a (B, K, d) tensor of probes with
            E[v vᵀ] = I (deterministic results; ``probe_kind`` and ``generator`` then do not
            apply).
        probe_kind: how probes are drawn: ``"rademacher"`` (default), ``"gaussian"`` or
            ``"orthogonal"`` (K <= d); see :func:`rnf_fast.make_probes`. Their measured
            gradient variances are in the README ("Preconditioning, warm starts and probe
            variance", from ``bench/results/probes.md``).
        generator: torch.Generator the probes are drawn from (reproducibility).
        tol: relative residual tolerance per system, ‖r‖ <= tol·‖v‖.
        max_iter: CG iteration cap; None (default): d, where CG is exact in exact arithmetic.
        fixed_iterations: run exactly ``max_iter`` iterations with no host synchronisation
            inside the loop (converged systems are frozen by masks), for CUDA graphs.
        preconditioner: None (default), ``"jacobi"``, ``"batch"``, or a tensor M: (d, d) or
            (B, d, d) symmetric positive definite, (d,) or (B, d) a positive diagonal
            (:mod:`rnf_fast.engine.precondition`).
        x0: (B, K, d) initial guess of u_k = A⁻¹ v_k (v_k = L ε_k with a preconditioner), e.g.
            ``LogdetInfo.cg.solution`` of an earlier call with the same probes; the value is
            then unavailable (NaN, see ``LogdetInfo.value_available``).
        truncation: None (default: CG stops at ``tol`` or ``max_iter``), or a
            :class:`~rnf_fast.engine.truncation.Roulette`: the number of iterations is drawn at
            random (from ``generator`` if given) and the steps reweighted, so the gradient is
            an unbiased estimate of the one untruncated CG gives, at fewer iterations on
            average and a larger variance (:mod:`rnf_fast.engine.truncation`).
        cuda_graph: run the solve as one CUDA graph, captured once per shape and replayed by
            later calls (:mod:`rnf_fast.engine.graph_cg`); it implies ``fixed_iterations``.
            None (default): on where ``RNF_FAST_CG_GRAPH=1`` is set (read at each call) and z
            is on a CUDA device, else off; True for a z off CUDA is a ``ValueError``. Off by
            default until measured on a GPU. A call the graph cannot serve (autocast, a
            truncation, a generic linearization, a failed capture) runs the eager solve;
            ``LogdetInfo.cg.graph`` says which ran, and why.

    Example:
        >>> from rnf_fast import CG
        >>> CG(probes=4, probe_kind="orthogonal").K
        4
        >>> CG(tol=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: tol must be a finite number >= 0, got -1.0
    """

    probes: int | Tensor = 1
    probe_kind: ProbeKind = "rademacher"
    generator: torch.Generator | None = None
    tol: float = DEFAULT_CG_TOL
    max_iter: int | None = None
    fixed_iterations: bool = False
    preconditioner: str | Tensor | None = None
    x0: Tensor | None = None
    truncation: Roulette | None = None
    cuda_graph: bool | None = None

    def __post_init__(self) -> None:
        probes = self.probes
        if isinstance(probes, Tensor):
            if probes.dim() != 3 or probes.shape[1] < 1:
                raise ValueError(
                    f"probes tensor must be (B, K, d) with K >= 1, got {tuple(probes.shape)}"
                )
            if self.probe_kind != "rademacher":
                raise ValueError(
                    f"probe_kind applies to drawn probes, but probes is a tensor; got "
                    f"probe_kind={self.probe_kind!r}"
                )
            if self.generator is not None and self.truncation is None:
                raise ValueError(
                    "generator applies to drawn probes (or a truncation's draw), but probes is "
                    "a tensor and truncation is None"
                )
        else:
            _check_positive_int("probes", probes)
        if self.probe_kind not in PROBE_KINDS:
            raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {self.probe_kind!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(
                f"generator must be None or a torch.Generator, got {type(self.generator).__name__}"
            )
        tol = self.tol
        number = isinstance(tol, (int, float)) and not isinstance(tol, bool)
        if not number or not math.isfinite(tol) or tol < 0:
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        if self.max_iter is not None:
            _check_positive_int("max_iter", self.max_iter)
        if not isinstance(self.fixed_iterations, bool):
            raise TypeError(f"fixed_iterations must be a bool, got {self.fixed_iterations!r}")
        check_preconditioner(self.preconditioner)
        if self.truncation is not None and not isinstance(self.truncation, Roulette):
            raise TypeError(
                f"truncation must be None or a Roulette, got {type(self.truncation).__name__}"
            )
        if self.x0 is not None and not isinstance(self.x0, Tensor):
            raise TypeError(f"x0 must be None or a (B, K, d) tensor, got {type(self.x0).__name__}")
        if self.cuda_graph is not None and not isinstance(self.cuda_graph, bool):
            raise TypeError(f"cuda_graph must be None or a bool, got {self.cuda_graph!r}")

    @property
    def K(self) -> int:
        """Probes per sample."""
        return self.probes.shape[1] if isinstance(self.probes, Tensor) else self.probes


Method = MethodName | Exact | CG

EXACT_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(Exact))
"""The flat keywords that map onto :class:`Exact`."""

CG_OPTIONS: tuple[str, ...] = tuple(f.name for f in fields(CG))
"""The flat keywords that map onto :class:`CG`."""

_DEFAULTS = {f.name: f.default for cls in (Exact, CG) for f in fields(cls)}


def _is_default(default: object, value: object) -> bool:
    if value is default:
        return True
    if isinstance(value, (Tensor, torch.Generator)) or isinstance(default, (Tensor, type(None))):
        return False
    return type(value) is type(default) and value == default


def _not_applicable(name: str, method: object) -> ValueError:
    owner = "exact" if name in EXACT_OPTIONS else "cg"
    return ValueError(f"{name} applies to method={owner!r} (or 'auto') only, got method={method!r}")


@dataclass(frozen=True)
class ResolvedOptions:
    """A call's method and the options of the methods it may run.

    Attributes:
        method: ``"auto"``, ``"exact"`` or ``"cg"``.
        exact: the exact method's options (None when the method is ``"cg"``).
        cg: the CG options (None when the method is ``"exact"``).
        exact_set, cg_set: names of the options the caller set for each method, for
            ``LogdetInfo.unused_options``.
    """

    method: MethodName
    exact: Exact | None
    cg: CG | None
    exact_set: tuple[str, ...] = ()
    cg_set: tuple[str, ...] = ()

    def unused(self, chosen: Literal["exact", "cg"]) -> tuple[str, ...]:
        """The options the caller set for the method that did not run."""
        return self.cg_set if chosen == "exact" else self.exact_set


def resolve_options(method: object, flat: dict[str, object]) -> ResolvedOptions:
    """Map ``method`` and the flat keywords onto option objects.

    Arguments:
        method: ``"auto"``, ``"exact"``, ``"cg"``, an :class:`Exact` or a :class:`CG`.
        flat: every flat keyword of :data:`EXACT_OPTIONS` and :data:`CG_OPTIONS` with its value
            (those at their defaults count as not set).

    Returns:
        A :class:`ResolvedOptions`.

    Raises:
        ValueError: an unknown method, a set option that does not apply to the method (the one
            exception: a ``generator`` for the exact method, which draws nothing, is reported
            as unused, so a caller can pass one source of randomness whatever method runs), or
            an option given both in an object and as a flat keyword.

    Example:
        >>> resolve_options("cg", {"probes": 4, "chunk_size": None}).cg
        CG(probes=4)
        >>> resolve_options("cg", {"chunk_size": 8})
        Traceback (most recent call last):
        ...
        ValueError: chunk_size applies to method='exact' (or 'auto') only, got method='cg'
    """
    unknown = sorted(set(flat) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}")
    given = {k: v for k, v in flat.items() if not _is_default(_DEFAULTS[k], v)}
    exact_set = tuple(k for k in EXACT_OPTIONS if k in given)
    cg_set = tuple(k for k in CG_OPTIONS if k in given)
    if isinstance(method, (Exact, CG)):
        own = EXACT_OPTIONS if isinstance(method, Exact) else CG_OPTIONS
        for name in (*exact_set, *cg_set):
            if name in own:
                raise ValueError(
                    f"{name} is given both in method={method!r} and as a keyword; give it once"
                )
            if not (isinstance(method, Exact) and name == "generator"):
                raise _not_applicable(name, method)
        if isinstance(method, Exact):
            return ResolvedOptions("exact", method, None, cg_set=cg_set)
        return ResolvedOptions("cg", None, method)
    if isinstance(method, str) and method in ("auto", "exact", "cg"):
        if method == "exact":
            for name in cg_set:
                if name != "generator":
                    raise _not_applicable(name, method)
        if method == "cg" and exact_set:
            raise _not_applicable(exact_set[0], method)
        exact = Exact(**{k: flat[k] for k in EXACT_OPTIONS if k in flat})
        cg = CG(**{k: flat[k] for k in CG_OPTIONS if k in flat}) if method != "exact" else None
        return ResolvedOptions(
            method, exact if method != "cg" else None, cg, exact_set=exact_set, cg_set=cg_set
        )
    if isinstance(method, str):
        raise ValueError(
            f"method must be 'auto', 'exact', 'cg', an Exact or a CG object, got {method!r}"
        )
    raise TypeError(
        f"method must be 'auto', 'exact', 'cg', an Exact or a CG object, got "
        f"{type(method).__name__}"
    )
