"""The rectangular (injective) flow x = g(z) = f(pad(z)), z = h(u), u ~ N(0, I_d).

Its density with respect to d-dimensional volume on the learned manifold is

    log p(x) = log p_Z(z) - ½ log det(JᵀJ),   z = g†(x),   J = ∂g/∂z (D × d per sample),

evaluated at the projection g(g†(x)) of x onto the manifold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import check_rows
from ..engine.api import Method, logdet
from ..flows import ActNorm, Permutation
from ..linearize.flows import PaddedFlowDecoder, PaddedFlowLinearization
from .builders import build_f, build_h
from .config import FlowConfig
from .serialization import atomic_save, load_payload, load_state

__all__ = ["LogProbTerms", "RectangularDecoder", "RectangularFlow"]

MODEL_FORMAT = "rnf_fast.RectangularFlow"
MODEL_VERSION = 1


@dataclass
class LogProbTerms:
    """The parts of the exact log-likelihood of x, each (B,).

    Attributes:
        log_prob: log p(x) = log_pz - ½ logdet.
        log_pz: log p_Z(z) at z = g†(x).
        logdet: log det(JᵀJ) at z.
        sq_error: ‖x - g(g†(x))‖², the squared distance of x from its projection.
    """

    log_prob: Tensor
    log_pz: Tensor
    logdet: Tensor
    sq_error: Tensor


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
        self, x: Tensor, *, chunk_size: int = 1024, method: Method = "exact"
    ) -> LogProbTerms:
        """log p(x) and its parts, evaluated in chunks of rows under ``torch.no_grad()``.

        Arguments:
            x: (B, D) finite data.
            chunk_size: rows per chunk; bounds the memory (the exact log det holds d tangents
                of each row).
            method: of the log det: ``"exact"`` (default), or ``"cg"``/``"auto"`` for a
                stochastic Lanczos estimate when d is large.

        Returns:
            :class:`LogProbTerms`, each (B,).
        """
        self._check_x(x)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        parts: list[tuple[Tensor, Tensor, Tensor]] = []
        decoder = self.decoder
        for chunk in x.split(chunk_size):
            z = self.encode(chunk)
            sq_error = ((chunk - decoder(z)) ** 2).sum(1)
            parts.append((self.latent_log_prob(z), logdet(decoder, z, method=method), sq_error))
        log_pz, ld, sq_error = (torch.cat(column) for column in zip(*parts))
        return LogProbTerms(log_pz - 0.5 * ld, log_pz, ld, sq_error)

    def log_prob(self, x: Tensor, *, chunk_size: int = 1024, method: Method = "exact") -> Tensor:
        """The exact log density log p_Z(g†(x)) - ½ log det(JᵀJ), in chunks, without a graph.

        A density on the learned manifold, taken at the projection of x: report it beside
        ``log_prob_terms(x).sq_error``. Arguments as :meth:`log_prob_terms`.

        Returns:
            (B,) log densities.
        """
        return self.log_prob_terms(x, chunk_size=chunk_size, method=method).log_prob

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
