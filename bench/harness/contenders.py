"""Contenders: the ways of computing the log det(JᵀJ) term and its gradient, one registry.

:func:`contenders` lists every one (rnf_fast's methods, chunk sizes, paths and backends; the
autodiff Jacobians; the official code's algorithm; the free-form surrogate), each marked
whether the suite runs it; :func:`step_closure` turns one into a training step and
:func:`verify` checks its answer against a problem's float64 truth the way its math promises.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rnf_fast import Roulette, logdet_grad
from rnf_fast.ops.dispatch import available_backends
from rnf_fast.testing import grads, rel_error

from .baselines import logdet_fif, logdet_jacfwd, logdet_jacrev, logdet_official_cg
from .problems import Problem, pseudo_inverse_encoder

__all__ = [
    "FLOAT64_TOL",
    "GRAD_TOL",
    "JACFWD",
    "JACREV",
    "OFFICIAL",
    "FIF",
    "STUDY_CONTENDERS",
    "VALUE_TOL",
    "Contender",
    "contenders",
    "flat",
    "flat_grads",
    "step_closure",
    "suite_contenders",
    "verify",
]

JACFWD = "forward-mode (vmap(jacfwd))"
JACREV = "reverse-mode (vmap(jacrev))"
OFFICIAL = "official code (CG, K=1)"
FIF = "free-form surrogate (FIF, K=1)"


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
        suite: whether the suite (``rnf-fast bench``) runs it; the others (chunk sizes, the
            generic path) are named by the pytest-benchmark tables.
    """

    kind: str
    fn: Callable[..., tuple[Tensor, dict]]
    has_value: bool = True
    kwargs: dict = field(default_factory=dict)
    suite: bool = True


def _rnf(kwargs: dict, *, suite: bool = True) -> Contender:
    def fn(decoder, z, encoder):
        with warnings.catch_warnings():
            # Systems that reach max_iter are counted in the stats ("cg_unconverged") instead.
            warnings.filterwarnings("ignore", "CG reached max_iter", RuntimeWarning)
            value, info = logdet_grad(decoder, z, **kwargs, return_info=True)
        cg = info.cg  # None on the exact path
        return value, {
            "cg_unconverged": None if cg is None else float((~cg.converged).float().mean()),
            "method": info.method,
            "backend": info.backend,
            "batching": info.batching,
            "matvecs": 0 if cg is None else cg.matvecs,
            "cg_iterations": None if cg is None else float(cg.iterations.float().mean()),
        }

    return Contender("rnf", fn, kwargs=kwargs, suite=suite)


def _dense(logdet_fn: Callable[[Callable, Tensor], Tensor]) -> Contender:
    return Contender("dense", lambda decoder, z, encoder: (logdet_fn(decoder, z), {}))


def _official(decoder, z, encoder):
    return logdet_official_cg(decoder, z, probes=1, return_info=True)


def _fif(decoder, z, encoder):
    return logdet_fif(decoder, encoder, z, probes=1), {"matvecs": 0}


def contenders(device: str = "cpu") -> dict[str, Contender]:
    """Every contender on a device, in table order.

    rnf_fast exact (also with ``chunk_size`` 16 and 4, and on the generic path), CG with K = 1
    (also on the generic path, and under randomized truncation ``Roulette(4, 0.5)``) and 4,
    auto, exact and CG K = 1 with each non-default available
    backend forced; the two autodiff Jacobians; the official code's algorithm; the free-form
    injective flow surrogate.

    Arguments:
        device: ``"cpu"`` or ``"cuda"``: the backends that serve it get their contenders.

    Returns:
        Name to :class:`Contender`; :func:`suite_contenders` keeps those with ``suite`` set.
    """
    out: dict[str, Contender] = {
        "rnf_fast exact": _rnf({"method": "exact"}),
        "rnf_fast exact chunk=16": _rnf({"method": "exact", "chunk_size": 16}, suite=False),
        "rnf_fast exact chunk=4": _rnf({"method": "exact", "chunk_size": 4}, suite=False),
        "rnf_fast cg K=1": _rnf({"method": "cg", "probes": 1}),
        "rnf_fast cg K=4": _rnf({"method": "cg", "probes": 4}),
        "rnf_fast cg K=1 roulette": _rnf(
            {"method": "cg", "probes": 1, "truncation": Roulette(min_iter=4, continue_prob=0.5)}
        ),
        "rnf_fast auto": _rnf({"method": "auto"}),
        "rnf_fast exact, generic path": _rnf({"method": "exact", "batching": "vmap"}, suite=False),
        "rnf_fast cg K=1, generic path": _rnf(
            {"method": "cg", "probes": 1, "batching": "vmap"}, suite=False
        ),
    }
    for b in available_backends(device)[1:]:  # [0] is the default the rows above use
        out[f"rnf_fast exact, {b} backend"] = _rnf({"method": "exact", "backend": b})
        out[f"rnf_fast cg K=1, {b} backend"] = _rnf({"method": "cg", "probes": 1, "backend": b})
    out[JACFWD] = _dense(logdet_jacfwd)
    out[JACREV] = _dense(logdet_jacrev)
    out[OFFICIAL] = Contender("official", _official, has_value=False)
    out[FIF] = Contender("fif", _fif, has_value=False)
    return out


def suite_contenders(device: str = "cpu") -> dict[str, Contender]:
    """The contenders the suite runs on a device (those of :func:`contenders` with ``suite``)."""
    return {name: c for name, c in contenders(device).items() if c.suite}


STUDY_CONTENDERS = ("rnf_fast exact", "rnf_fast cg K=1", "rnf_fast cg K=4", JACFWD, OFFICIAL)
"""The contenders of the exact-vs-CG study over d."""


def step_closure(
    problem: Problem, contender: Contender, encoder: Callable[[Tensor], Tensor] | None = None
) -> Callable[[], tuple[Tensor, dict]]:
    """A training step of a contender on a problem: zero the gradients, the log det term,
    backward.

    Arguments:
        problem: the decoder, z (B, d) and the parameters whose gradients are cleared.
        contender: what computes the term.
        encoder: the FIF contender's encoder (:func:`harness.problems.problem_encoder`).

    Returns:
        A closure returning the (B,) detached term and the contender's stats.
    """

    def step() -> tuple[Tensor, dict]:
        for p in problem.params:
            p.grad = None
        problem.z.grad = None
        value, stats = contender.fn(problem.decoder, problem.z, encoder)
        value.sum().backward()
        return value.detach(), stats

    return step


def flat_grads(problem: Problem) -> Tensor:
    """The gradients of ``[*problem.params, problem.z]`` after a step, flattened into one
    float64 CPU vector (zeros where a tensor got none)."""
    tensors = [*problem.params, problem.z]
    return torch.cat(
        [(torch.zeros_like(t) if t.grad is None else t.grad).double().flatten() for t in tensors]
    ).cpu()


def flat(tensors: list[Tensor]) -> Tensor:
    """Tensors flattened into one float64 CPU vector."""
    return torch.cat([t.detach().double().flatten().cpu() for t in tensors])


VALUE_TOL, GRAD_TOL = 1e-4, 1e-3
"""float32 contenders against the float64 truth: relative error of the value and gradient."""
FLOAT64_TOL = 1e-6
"""The official and FIF algorithms, run in float64 with d scaled unit probes (and CG to
convergence): relative gradient error against the float64 truth."""


def verify(
    problem: Problem,
    name: str,
    contender: Contender,
    encoder: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, float | None]:
    """Check a contender on a problem with truth, then report its single-step errors.

    The bounds follow what each method promises. Exact ones (rnf_fast exact, the autodiff
    Jacobians): value within ``VALUE_TOL`` and gradient within ``GRAD_TOL`` (float32).
    rnf_fast CG: with K = d scaled unit probes (√d e_i, E[v vᵀ] = I) and tol 1e-7 (up to 10·d
    iterations), on the contender's backend and batching, it must reproduce the exact gradient
    within ``GRAD_TOL``. The official code's algorithm and FIF run in float64 with the same
    probes (CG to tol 1e-12, up to 10·d steps; FIF with the exact pseudo-inverse as encoder) and
    must match within ``FLOAT64_TOL``. The stochastic and biased contenders' own single-draw
    errors are reported, not bounded.

    Arguments:
        problem: a problem built with its truth (:func:`harness.problems.make_problem`).
        name: the contender's name, for the error message.
        contender: the contender.
        encoder: the FIF contender's encoder of this problem.

    Returns:
        ``{"value_rel_err": ... or None, "grad_rel_err": ...}`` of one step as timed.

    Raises:
        ValueError: when the problem was built without its truth.
        AssertionError: naming the contender and the error.
    """
    if problem.z64 is None:
        raise ValueError("problem must be built with its truth (make_problem(truth=True))")
    value, stats = step_closure(problem, contender, encoder)()
    truth = flat(problem.truth_grads)
    errors: dict[str, float | None] = {
        "value_rel_err": (
            rel_error(value.double().cpu(), problem.truth_value) if contender.has_value else None
        ),
        "grad_rel_err": rel_error(flat_grads(problem), truth),
    }
    B, d = problem.z.shape
    method = stats.get("method")
    if contender.kind == "dense" or method == "exact":
        if errors["value_rel_err"] > VALUE_TOL or errors["grad_rel_err"] > GRAD_TOL:
            raise AssertionError(f"{name} disagrees with the float64 truth: {errors}")
        return errors
    if method == "cg":
        V = (d**0.5) * torch.eye(d, device=problem.z.device).expand(B, d, d)
        kw = {k: v for k, v in contender.kwargs.items() if k in ("backend", "batching")}
        with warnings.catch_warnings():
            # With float32 products CG loses orthogonality and needs more than d steps when
            # JᵀJ is ill-conditioned (flow-mnist: cond(J) ≈ 30, 39 steps on average to reach
            # 1e-7 at d = 20), so the check lets it run to 10·d; the gradient bound is the test.
            warnings.filterwarnings("ignore", "CG reached max_iter", RuntimeWarning)
            check = logdet_grad(
                problem.decoder, problem.z, method="cg", probes=V, tol=1e-7, max_iter=10 * d, **kw
            )
        err = rel_error(flat(grads(check, [*problem.params, problem.z])), truth)
        bound = GRAD_TOL
    elif contender.kind in ("official", "fif"):
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
        err = rel_error(flat(grads(check, [*problem.params64, z64])), truth)
        bound = FLOAT64_TOL
    else:
        raise ValueError(f"no check for contender kind {contender.kind!r} ({name})")
    if err > bound:
        raise AssertionError(
            f"{name}: with d scaled unit probes its gradient is off the truth by {err:.2e} "
            f"(bound {bound:.0e})"
        )
    return errors
