"""Activation normalisation (Glow): a per-feature affine map with data-dependent initialisation."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Flow, check_channels, check_positive

__all__ = ["ActNorm"]


class ActNorm(Flow):
    """The per-feature (per-channel for images) affine map y = (x - loc) · exp(log_scale).

    Data-dependent initialisation: the first call in training mode on an uninitialised layer sets
    loc and log_scale from its batch so that the call's output has zero mean and unit variance per
    feature. That holds for ``inverse`` too (it then standardises the inverse's output): in this
    library the data usually enters a flow through ``inverse`` (x -> z), and initialising only on
    ``forward`` would standardise the padded latent side instead. The ``initialized`` buffer is
    saved and loaded with the ``state_dict``, so a loaded model is never re-initialised. For
    multi-process training, call ``initialize`` on one rank and broadcast the module's state.

    Features whose batch standard deviation is at most ``eps`` (e.g. constant padding) keep unit
    scale instead of being blown up by 1/eps.

    Arguments:
        num_features: n for x (B, n), or C for images x (B, C, H, W).
        eps: standard-deviation floor of the initialisation.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        check_positive("num_features", num_features)
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_features = num_features
        self.eps = float(eps)
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        # Python-side copy of `initialized`, so training steps do not read a device flag.
        self._seen_initialized = False
        self.register_load_state_dict_post_hook(ActNorm._forget_seen_initialized)

    @staticmethod
    def _forget_seen_initialized(module: ActNorm, incompatible_keys: object) -> None:
        module._seen_initialized = False

    @torch.no_grad()
    def initialize(self, x: Tensor, *, inverse: bool = False) -> None:
        """Set loc and log_scale from a batch, and mark the layer initialised.

        Arguments:
            x: (B, n) or (B, C, H, W), a batch of this layer's inputs (of ``inverse``'s inputs
                when ``inverse``); needs at least 2 values per feature.
            inverse: standardise the output of ``inverse(x)`` instead of ``forward(x)``.
        """
        check_channels("x", x, self.num_features)
        dims = [0, *range(2, x.dim())]
        if x.numel() // self.num_features < 2:
            raise ValueError(f"x must have at least 2 values per feature, got {tuple(x.shape)}")
        mean = x.mean(dims)
        std = x.std(dims, correction=0)
        std = torch.where(std > self.eps, std, torch.ones_like(std))
        if inverse:
            self.loc.copy_(-mean / std)
            self.log_scale.copy_(torch.log(std))
        else:
            self.loc.copy_(mean)
            self.log_scale.copy_(-torch.log(std))
        self.initialized.fill_(True)
        self._seen_initialized = True

    def _maybe_initialize(self, x: Tensor, inverse: bool) -> None:
        if self.training and not self._seen_initialized:
            if not self.initialized:
                self.initialize(x, inverse=inverse)
            self._seen_initialized = True

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """loc and log_scale broadcastable to x, and log|det| (B,) of the forward map."""
        shape = (1, self.num_features) + (1,) * (x.dim() - 2)
        pixels = math.prod(x.shape[2:])
        logabsdet = (pixels * self.log_scale.sum()).expand(x.shape[0])
        return self.loc.view(shape), self.log_scale.view(shape), logabsdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the map: x (B, n) or (B, C, H, W) -> (y (same shape), logabsdet (B,))."""
        check_channels("x", x, self.num_features)
        self._maybe_initialize(x, inverse=False)
        loc, log_scale, logabsdet = self._params(x)
        return (x - loc) * torch.exp(log_scale), logabsdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the map: y (B, n) or (B, C, H, W) -> (x (same shape), logabsdet (B,))."""
        check_channels("y", y, self.num_features)
        self._maybe_initialize(y, inverse=True)
        loc, log_scale, logabsdet = self._params(y)
        return y * torch.exp(-log_scale) + loc, -logabsdet
