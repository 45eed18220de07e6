"""The rectangular (injective) flow x = g(z) = f(pad(z)), z = h(u), u ~ N(0, I_d).

Its density with respect to d-dimensional volume on the learned manifold is

    log p(x) = log p_Z(z) - ½ log det(JᵀJ),   z = g†(x),   J = ∂g/∂z (D × d per sample),

evaluated at the projection g(g†(x)) of x onto the manifold.

Singular samples: where JᵀJ is numerically singular (J rank deficient to the precision of the
model's dtype, as :func:`rnf_fast.logdet_grad` detects it) the log det is rounding error, not
geometry, and a very negative one: a density there is meaningless and would flatter the model.
:meth:`RectangularFlow.log_prob_terms` marks such samples (``LogProbTerms.singular``) and by
default gives them a NaN log det and log p, so that no mean silently includes them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_rows
from ..engine.api import Method, SingularJacobianError, logdet_grad
from ..engine.checks import OnSingular, check_on_singular, warn_at_caller
from ..flows import ActNorm, Permutation
from ..linearize.flows import PaddedFlowDecoder, PaddedFlowLinearization
from .builders import build_f, build_h
from .config import FlowConfig
from .serialization import atomic_save, load_payload, load_state

__all__ = ["SINGULAR_WARNING", "LogProbTerms", "RectangularDecoder", "RectangularFlow"]

MODEL_FORMAT = "rnf_fast.RectangularFlow"
MODEL_VERSION = 1

SINGULAR_WARNING = "JᵀJ is numerically singular"
"""How the warnings about singular samples begin, the engine's (one per call) and
:meth:`RectangularFlow.log_prob_terms`' (one per call, over all its chunks): a caller that
counts ``LogProbTerms.singular`` itself silences both with
``warnings.filterwarnings("ignore", message=SINGULAR_WARNING)``."""


@dataclass
class LogProbTerms:
    """The parts of the exact log-likelihood of x, each (B,).

    Attributes:
        log_prob: log p(x) = log_pz - ½ logdet; NaN where ``singular`` (by default, see
            :meth:`RectangularFlow.log_prob_terms`).
        log_pz: log p_Z(z) at z = g†(x) (finite where ``singular`` too).
        logdet: log det(JᵀJ) at z; NaN where ``singular`` (by default).
        sq_error: ‖x - g(g†(x))‖², the squared distance of x from its projection (finite
            where ``singular`` too).
        singular: bool, the samples whose JᵀJ is numerically singular: their log det is
            rounding error, so a mean of ``log_prob`` must leave them out and say how many it
            left out.
    """

    log_prob: Tensor
    log_pz: Tensor
    logdet: Tensor
    sq_error: Tensor
    singular: Tensor


class RectangularDecoder(nn.Module):
    """The decoder g = f ∘ perm ∘ pad of a rectangular flow, with its explicit linearization.

    Calling it is ``model.decode``; :meth:`linearize` is what :func:`rnf_fast.logdet_grad` uses
    (through :func:`rnf_fast.linearize`): one pass of the decoder caching every layer's Jacobian
    factors, then J v and Jᵀ w without primal recomputation (see
    :mod:`rnf_fast.linearize.flows`). Its parameters are the model's.

    Arguments:
        model: the :class:`RectangularFlow` whose decoder this is.
    """

    def __init__(self, model: RectangularFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        """x = g(z): z (B, d) -> (B, D)."""
        return self.model.decode(z)

    def linearize(self, z: Tensor) -> PaddedFlowLinearization:
        """The decoder linearized at z (B, d): a :class:`rnf_fast.Linearization`."""
        check_rows("z", z, self.model.d, rows="B", what="d", finite=False)
        return self.model._padded_flows().linearize(z)


class RectangularFlow(nn.Module):
    """An injective flow g: R^d -> R^D with a density on its image.

    Parts: ``h`` (a square flow on R^d with a standard normal base), ``pad`` (z -> (z, 0) in R^D
    followed by a fixed random permutation, a buffer saved with the model) and ``f`` (a square
    flow on R^D). Everything is built from ``config`` and its seed, so the same config always
    gives the same initial model.

    The ActNorm layers initialise from the first batch they see in training mode; call
    :meth:`initialize` with a large batch of data first (the trainer does).

    Arguments:
        config: a :class:`FlowConfig`, or a mapping of its fields.

    Example:
        >>> import torch
        >>> from rnf_fast.models import RectangularFlow
        >>> model = RectangularFlow({"D": 3, "d": 2, "f_layers": 2, "h_layers": 2})
        >>> x = torch.randn(16, 3)
        >>> model.initialize(x)
        >>> model.log_prob(x).shape, model.sample(4).shape
        (torch.Size([16]), torch.Size([4, 3]))
    """

    def __init__(self, config: FlowConfig | Mapping[str, Any]) -> None:
        super().__init__()
        if not isinstance(config, FlowConfig):
            config = FlowConfig.from_dict(config)
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.pad_permutation = Permutation(config.D)
            self.f = build_f(config)
            self.h = build_h(config)

    @property
    def D(self) -> int:
        """Ambient dimension."""
        return self.config.D

    @property
    def d(self) -> int:
        """Latent dimension."""
        return self.config.d

    def _check_x(self, x: Tensor) -> None:
        check_rows("x", x, self.D, rows="B", what="D")

    def encode(self, x: Tensor) -> Tensor:
        """The left inverse z = g†(x): the first d coordinates of the un-permuted f⁻¹(x).

        Arguments:
            x: (B, D) finite data.

        Returns:
            z (B, d), differentiable with respect to x and f's parameters.
        """
        self._check_x(x)
        y, _ = self.f.inverse(x)
        padded, _ = self.pad_permutation.inverse(y)
        return padded[:, : self.d]

    def decode(self, z: Tensor) -> Tensor:
        """The injective map x = g(z) = f(perm(z, 0)): the decoder whose log det(JᵀJ) enters.

        Checks shapes only (no data-dependent checks), so ``torch.func`` transforms can trace it.

        Arguments:
            z: (B, d) latents.

        Returns:
            x (B, D).
        """
        check_rows("z", z, self.d, rows="B", what="d", finite=False)
        return self._padded_flows()(z)

    def _padded_flows(self) -> PaddedFlowDecoder:
        """g = f ∘ perm ∘ pad as the shared padded-flow decoder (no checks)."""
        return PaddedFlowDecoder((self.pad_permutation, self.f), D=self.D)

    @property
    def decoder(self) -> RectangularDecoder:
        """The decoder z -> :meth:`decode` (z) as a module with an explicit ``linearize(z)``:
        pass it to :func:`rnf_fast.logdet_grad` / :func:`rnf_fast.logdet` instead of
        ``decode`` for the fast path (same values and gradients)."""
        return RectangularDecoder(self)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The projection g(g†(x)) of x onto the learned manifold: x (B, D) -> (B, D)."""
        return self.decode(self.encode(x))

    def latent_log_prob(self, z: Tensor) -> Tensor:
        """log p_Z(z) of the latent flow h with its standard normal base: z (B, d) -> (B,)."""
        check_rows("z", z, self.d, rows="B", what="d", finite=False)
        u, logabsdet = self.h.inverse(z)
        return -0.5 * (u * u).sum(1) - 0.5 * self.d * math.log(2 * math.pi) + logabsdet

    @torch.no_grad()
    def log_prob_terms(
        self,
        x: Tensor,
        *,
        chunk_size: int = 1024,
        method: Method = "exact",
        on_singular: OnSingular = "nan",
    ) -> LogProbTerms:
        """log p(x) and its parts, evaluated in chunks of rows under ``torch.no_grad()``.

        A sample whose JᵀJ is numerically singular (J rank deficient to the precision of the
        model's dtype: ``on_singular`` of :func:`rnf_fast.logdet_grad` says how the engine
        tells) has a log det that is rounding error, so no density. It is always marked in
        ``LogProbTerms.singular``, and one warning per call counts such samples (it begins
        with :data:`SINGULAR_WARNING`); what its ``logdet`` and ``log_prob`` hold is
        ``on_singular``'s choice. Its ``log_pz`` and ``sq_error`` are computed as for any
        sample.

        Arguments:
            x: (B, D) finite data.
            chunk_size: rows per chunk; bounds the memory (the exact log det holds d tangents
                of each row).
            method: of the log det: ``"exact"`` (default), or ``"cg"``/``"auto"`` for a
                stochastic Lanczos estimate when d is large.
            on_singular: ``"nan"`` (default): the log det and log p of a singular sample are
                NaN, so a mean over the batch is NaN unless it leaves the marked samples out.
                ``"jitter"``: the engine's value where it has one (jittered where the Cholesky
                factorisation needs it: rounding-dominated, for diagnostics, not for
                reporting), NaN where it has none. ``"raise"``:
                :class:`rnf_fast.SingularJacobianError` naming the rows.

        Returns:
            :class:`LogProbTerms`, each (B,).

        Example:
            >>> import torch
            >>> model = RectangularFlow({"D": 3, "d": 2, "f_layers": 2, "h_layers": 2})
            >>> x = torch.randn(8, 3)
            >>> model.initialize(x)
            >>> terms = model.log_prob_terms(x)
            >>> nll = -terms.log_prob[~terms.singular].mean()  # a mean that leaves them out
            >>> terms.singular.shape, int(terms.singular.sum())
            (torch.Size([8]), 0)
        """
        self._check_x(x)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        check_on_singular(on_singular)
        # "raise" runs as "nan" (both skip the jitter) and raises here, naming rows of x rather
        # than of a chunk.
        engine_choice = "jitter" if on_singular == "jitter" else "nan"
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        decoder = self.decoder
        start = 0  # the row of x where the chunk begins
        with warnings.catch_warnings():
            # One warning for the whole call below, in place of the engine's one per chunk.
            warnings.filterwarnings("ignore", message=SINGULAR_WARNING, category=RuntimeWarning)
            for chunk in x.split(chunk_size):
                z = self.encode(chunk)
                sq_error = ((chunk - decoder(z)) ** 2).sum(1)
                ld, info = logdet_grad(
                    decoder, z, method, on_singular=engine_choice, return_info=True
                )
                if on_singular == "raise" and bool(info.singular.any()):
                    rows = info.singular.nonzero().squeeze(-1) + start
                    among = f"of the {len(chunk)} sample(s) of the chunk from row {start}"
                    raise SingularJacobianError(self._singular_message(rows, among))
                parts.append((self.latent_log_prob(z), ld, sq_error, info.singular))
                start += len(chunk)
        log_pz, ld, sq_error, singular = (torch.cat(column) for column in zip(*parts))
        if bool(singular.any()):
            rows = singular.nonzero().squeeze(-1)
            among = f"of {len(x)} sample(s)"
            warn_at_caller(self._singular_message(rows, among, values=on_singular))
        return LogProbTerms(log_pz - 0.5 * ld, log_pz, ld, sq_error, singular)

    def _singular_message(self, rows: Tensor, among: str, *, values: str = "") -> str:
        """What a warning or error about singular samples says: ``rows`` (k,) their rows of x,
        ``among`` the samples looked at ("of 20 sample(s)"), ``values`` the ``on_singular``
        choice that set their values."""
        listed = rows[:10].tolist()
        dtype = str(next(self.parameters()).dtype).removeprefix("torch.")
        message = (
            f"{SINGULAR_WARNING} for {len(rows)} {among} (rows {listed}"
            f"{'...' if len(rows) > 10 else ''} of x): the decoder's Jacobian is rank deficient "
            f"to {dtype} precision there, so their log det is rounding error, not a density"
        )
        if values == "nan":
            message += (
                "; their logdet and log_prob are NaN. LogProbTerms.singular marks them: leave "
                "them out of a mean and report how many (rnf_fast.evaluation.evaluate does)"
            )
        elif values == "jitter":
            message += (
                "; on_singular='jitter' kept the engine's value where it had one (jittered "
                "where the Cholesky factorisation needed it: rounding-dominated), NaN elsewhere. "
                "LogProbTerms.singular marks them all: leave them out of any reported mean"
            )
        return message

    def log_prob(
        self,
        x: Tensor,
        *,
        chunk_size: int = 1024,
        method: Method = "exact",
        on_singular: OnSingular = "nan",
    ) -> Tensor:
        """The exact log density log p_Z(g†(x)) - ½ log det(JᵀJ), in chunks, without a graph.

        A density on the learned manifold, taken at the projection of x: report it beside
        ``log_prob_terms(x).sq_error``. NaN for a sample whose JᵀJ is numerically singular
        (by default; see :meth:`log_prob_terms`, whose ``singular`` marks them). Arguments as
        :meth:`log_prob_terms`.

        Returns:
            (B,) log densities.
        """
        terms = self.log_prob_terms(
            x, chunk_size=chunk_size, method=method, on_singular=on_singular
        )
        return terms.log_prob

    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        weight = next(self.parameters())
        device = generator.device if generator is not None else weight.device
        u = torch.randn(n, self.d, generator=generator, dtype=weight.dtype, device=device)
        return self.decode(self.h(u.to(weight.device))[0])

    def rsample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n samples x = g(h(u)), u ~ N(0, I_d), differentiable in the parameters: (n, D).

        Arguments:
            n: number of samples.
            generator: source of u (on any device; u is moved to the model's device).
        """
        return self._draw(n, generator)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """n samples from the model without a graph: (n, D). Arguments as :meth:`rsample`."""
        return self._draw(n, generator)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Initialise the not yet initialised ActNorm layers of f and h from data x (B, D).

        Runs x through f⁻¹ and h⁻¹ in training mode, so each ActNorm standardises what it
        sees; layers already initialised (e.g. loaded ones) are left as they are.
        """
        was_training = self.training
        self.train()
        try:
            self.h.inverse(self.encode(x))
        finally:
            self.train(was_training)

    def actnorms_initialized(self) -> bool:
        """Whether every ActNorm layer of the model has been initialised."""
        return all(bool(m.initialized) for m in self.modules() if isinstance(m, ActNorm))

    def save(self, path: str | os.PathLike) -> None:
        """Save the config and the weights to path, atomically (see :meth:`load`)."""
        weight = next(self.parameters())
        payload = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "config": self.config.to_dict(),
            "dtype": str(weight.dtype).removeprefix("torch."),
            "state_dict": self.state_dict(),
        }
        atomic_save(payload, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
    ) -> RectangularFlow:
        """Load a model written by :meth:`save`, with ``torch.load(weights_only=True)``.

        Arguments:
            path: the file.
            map_location: device of the returned model.

        Returns:
            The model (in training mode, as a constructed module is; call ``.eval()`` to
            evaluate without touching ActNorm).

        Raises:
            CheckpointError: the file is corrupt, not a saved model, or its weights do not fit
                its config.
        """
        payload = load_payload(path, kind=MODEL_FORMAT, version=MODEL_VERSION)
        model = cls(FlowConfig.from_dict(payload["config"]))
        model.to(getattr(torch, payload["dtype"]))
        load_state(model, payload["state_dict"], what=f"the weights in {str(path)!r}")
        return model.to(map_location)
