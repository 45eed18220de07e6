"""Training losses of a rectangular flow: maximum likelihood (ML), two-step (TS), ML without
log det.

ML (rectangular-flows maximum likelihood with a reconstruction penalty):

    loss = - mean_i [ w · log p(x_i) - β · ‖x_i - g(g†(x_i))‖² ],
    log p(x) = log p_Z(z) - ½ log det(JᵀJ),   z = g†(x) (graph kept),

where the log det's gradient comes from :func:`rnf_fast.logdet_grad`; with w = 0 (likelihood
warm-up) only the reconstruction term is computed. TS trains f by reconstruction alone and h by
the likelihood of the detached z, one phase at a time. ML without log det drops the log det term.

Singular samples (ML with the log det): a sample whose JᵀJ is numerically singular (the engine's
``LogdetInfo.singular``: J rank deficient to the precision of the model's dtype) has a log det
that is rounding error, and a very negative one: counting it, or a jittered value, would reward
a collapsing manifold. Such a sample is dropped whole: its log p_Z, log det and reconstruction
terms leave the loss, which is the mean over the other samples of the batch (0, with no gradient,
when none is left), and it passes no gradient. Every mean in ``parts`` is over the kept samples.

Every loss returns ``(loss, parts)``: the scalar to minimise and a dict of detached scalars for
logging: ``loss``, ``recon`` (mean ‖x - g(g†(x))‖²), and where computed ``log_pz``
(mean log p_Z(z)), ``logdet`` (mean log det JᵀJ), ``nll`` (mean -log p(x)), ``singular``
(the number of samples dropped as singular) and, when CG ran, ``cg_matvecs`` (its batched JᵀJ
products in this step; ``train_cg_matvecs`` in the training metrics is their mean per step).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from ..engine.api import DEFAULT_CG_TOL, Method, logdet_grad
from ..engine.calibrate import Calibrator
from ..engine.truncation import Roulette
from ..models import RectangularFlow

__all__ = ["OBJECTIVES", "TS_PHASES", "Objective", "ml_loss", "ts_loss"]

ObjectiveKind = Literal["ml", "ts", "ml-no-logdet"]
Phase = Literal["manifold", "density"]

OBJECTIVES: tuple[str, ...] = ("ml", "ts", "ml-no-logdet")
TS_PHASES: tuple[str, ...] = ("manifold", "density")


def _sq_error(x: Tensor, x_hat: Tensor) -> Tensor:
    return ((x - x_hat) ** 2).sum(1)


def ml_loss(
    model: RectangularFlow,
    x: Tensor,
    *,
    weight: float = 1.0,
    beta: float = 50.0,
    with_logdet: bool = True,
    method: Method = "auto",
    probes: int = 1,
    probe_kind: str = "rademacher",
    generator: torch.Generator | None = None,
    tol: float = DEFAULT_CG_TOL,
    chunk_size: int | None = None,
    max_iter: int | None = None,
    truncation: Roulette | None = None,
    auto_calibrate: bool | Calibrator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The ML loss -mean[w · log p(x) - β ‖x - g(g†(x))‖²] and its parts.

    Arguments:
        model: the rectangular flow.
        x: (B, D) a batch of data.
        weight: w, the likelihood weight; at 0 neither log p_Z nor the log det is computed.
        beta: β, the weight of the reconstruction penalty.
        with_logdet: include -½ log det(JᵀJ) in log p (False: the ML-without-log-det baseline).
        method, probes, probe_kind, generator, tol, chunk_size, max_iter, truncation: of
            :func:`rnf_fast.logdet_grad`.
        auto_calibrate: of :func:`rnf_fast.logdet_grad` (the trainer passes its run's
            :class:`~rnf_fast.engine.calibrate.Calibrator`, or False).

    Samples whose JᵀJ is numerically singular are dropped from every term and mean (see the
    module docstring); ``parts["singular"]`` counts them. The engine's warning about them is
    not silenced here (the trainer gathers them into one warning per epoch).

    With the log det, the reconstruction g(z) is the decoder output that
    :func:`rnf_fast.logdet_grad` computed with its graph (``LogdetInfo.output``: the flow
    decoder's explicit linearization runs the decoder once, keeping the graph), so a step runs
    the decoder's primal and its backward once, not twice (values equal, gradients to
    rounding: both terms' gradients now flow back through one graph); otherwise (w = 0, no log
    det, or a linearization that keeps no output) ``model.decode(z)``.

    Returns:
        (loss, parts): a scalar with a graph, and detached scalars (see the module docstring).
    """
    z = model.encode(x)
    keep = None
    x_hat = None
    if weight > 0:
        log_p = model.latent_log_prob(z)
        log_pz = log_p
        if with_logdet:
            ld, info = logdet_grad(
                model.decoder,
                z,
                method=method,
                probes=probes,
                probe_kind=probe_kind,
                generator=generator,
                tol=tol,
                max_iter=max_iter,
                truncation=truncation,
                chunk_size=chunk_size,
                auto_calibrate=auto_calibrate,
                on_singular="nan",
                return_info=True,
            )
            log_p = log_p - 0.5 * ld
            # The log det ran the decoder at z with its graph (LogdetInfo.output): the
            # reconstruction reuses it, one decoder primal and backward per step instead of two.
            x_hat = info.output
            singular = info.singular
            # No singular sample: keep=None, the plain means, bit for bit as without the check.
            keep = ~singular if bool(singular.any()) else None
    recon = _mean(_sq_error(x, model.decode(z) if x_hat is None else x_hat), keep)
    loss = beta * recon
    parts = {"recon": recon.detach()}
    if weight > 0:
        parts["log_pz"] = _mean(log_pz, keep).detach()
        if with_logdet:
            parts["logdet"] = _mean(ld, keep).detach()
            parts["nll"] = -_mean(log_p, keep).detach()
            parts["singular"] = singular.sum()
            if info.cg is not None:
                parts["cg_matvecs"] = torch.tensor(float(info.cg.matvecs))
        loss = loss - weight * _mean(log_p, keep)
    parts["loss"] = loss.detach()
    return loss, parts


def _mean(values: Tensor, keep: Tensor | None) -> Tensor:
    """The mean of values (B,) over the samples kept (keep (B,) bool; None: all), 0 if none is.

    ``torch.where`` rather than indexing or a product with the mask: the samples dropped are
    NaN (their log det) and get an exact zero gradient (0 · NaN would be NaN)."""
    if keep is None:
        return values.mean()
    return torch.where(keep, values, 0).sum() / keep.sum().clamp_min(1)


def ts_loss(
    model: RectangularFlow, x: Tensor, *, phase: Phase, beta: float = 50.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """The two-step loss of one phase and its parts.

    ``"manifold"``: β · mean ‖x - g(g†(x))‖², which depends on f only. ``"density"``:
    -mean log p_Z(z) with z = g†(x) detached, which depends on h only.

    Arguments:
        model: the rectangular flow.
        x: (B, D) a batch of data.
        phase: ``"manifold"`` or ``"density"``.
        beta: β, the weight of the reconstruction error in the manifold phase.

    Returns:
        (loss, parts) as :func:`ml_loss`.
    """
    if phase == "manifold":
        sq_error = _sq_error(x, model.reconstruct(x)).mean()
        loss = beta * sq_error
        parts = {"recon": sq_error.detach()}
    elif phase == "density":
        with torch.no_grad():
            z = model.encode(x)
        loss = -model.latent_log_prob(z).mean()
        parts = {"log_pz": -loss.detach()}
    else:
        raise ValueError(f"phase must be one of {TS_PHASES}, got {phase!r}")
    parts["loss"] = loss.detach()
    return loss, parts


class Objective(nn.Module):
    """A training loss as a module whose ``forward`` returns it: what DDP wraps.

    Holds the model as a submodule, so wrapping an ``Objective`` in
    ``DistributedDataParallel`` synchronises the model's gradients, and the loss (log det
    included) is computed inside the wrapped forward.

    Arguments:
        model: the rectangular flow.
        kind: ``"ml"``, ``"ts"`` or ``"ml-no-logdet"``.
        beta: β of the reconstruction penalty.
        method, probes, probe_kind, tol, chunk_size, max_iter, truncation: of
            :func:`rnf_fast.logdet_grad` (ML only).
        auto_calibrate: of :func:`rnf_fast.logdet_grad` (ML only; the trainer sets it to its
            run's calibrator, or False).
    """

    def __init__(
        self,
        model: RectangularFlow,
        *,
        kind: ObjectiveKind = "ml",
        beta: float = 50.0,
        method: Method = "auto",
        probes: int = 1,
        probe_kind: str = "rademacher",
        tol: float = DEFAULT_CG_TOL,
        chunk_size: int | None = None,
        max_iter: int | None = None,
        truncation: Roulette | None = None,
        auto_calibrate: bool | Calibrator | None = None,
    ) -> None:
        super().__init__()
        if kind not in OBJECTIVES:
            raise ValueError(f"kind must be one of {OBJECTIVES}, got {kind!r}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.model = model
        self.kind = kind
        self.beta = float(beta)
        self.method = method
        self.probes = probes
        self.probe_kind = probe_kind
        self.tol = tol
        self.chunk_size = chunk_size
        self.auto_calibrate = auto_calibrate
        self.max_iter = max_iter
        self.truncation = truncation

    def forward(
        self,
        x: Tensor,
        *,
        weight: float = 1.0,
        phase: Phase | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss on a batch x (B, D) and its parts.

        Arguments:
            x: (B, D) data.
            weight: the likelihood weight w (ML objectives).
            phase: the TS phase, ``"manifold"`` or ``"density"`` (TS only).
            generator: of the CG probes.

        Returns:
            (loss, parts) as :func:`ml_loss`.
        """
        if self.kind == "ts":
            if phase is None:
                raise ValueError(f"phase must be one of {TS_PHASES} for kind 'ts', got None")
            return ts_loss(self.model, x, phase=phase, beta=self.beta)
        return ml_loss(
            self.model,
            x,
            weight=weight,
            beta=self.beta,
            with_logdet=self.kind == "ml",
            method=self.method,
            probes=self.probes,
            probe_kind=self.probe_kind,
            generator=generator,
            tol=self.tol,
            chunk_size=self.chunk_size,
            auto_calibrate=self.auto_calibrate,
            max_iter=self.max_iter,
            truncation=self.truncation,
        )
