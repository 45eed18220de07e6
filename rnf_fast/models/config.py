"""The configuration of a rectangular flow: dimensions and the sizes of its two square flows."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["FlowConfig"]

COUPLINGS = ("affine", "spline")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class FlowConfig:
    """What builds a :class:`~rnf_fast.models.RectangularFlow`; stored as a plain dict with it.

    Fields:
        D: ambient dimension of x (B, D).
        d: latent dimension of z (B, d), 1 <= d < D.
        f_layers, f_hidden, f_coupling: the flat flow f on R^D (``rnf_fast.flows.flat_flow``):
            number of couplings, conditioner widths, ``"affine"`` or ``"spline"``.
        h_layers, h_hidden, h_coupling: the same for h on R^d. For d = 1 (no coupling exists),
            h is ``h_layers`` × [ActNorm, elementwise spline] whatever ``h_coupling`` says.
        num_bins: bins of every spline.
        image_shape: (C, H, W) with C·H·W = D to make f the multi-scale image flow, read as
            the decoder (``rnf_fast.flows.builders.image_decoder``: the RealNVP's normalising
            direction is f⁻¹, data to latent) instead of a flat one; ``f_layers``, ``f_hidden``
            and ``f_coupling`` are then unused.
        image_scales, image_blocks, image_channels, image_res_blocks: ``num_scales``,
            ``blocks_per_scale``, ``channels`` and ``num_res_blocks`` of the image flow.
        logit_alpha: with ``image_shape``, α of the logit layer that f⁻¹ starts with (so the
            decoder ends with its inverse, a scaled sigmoid, and the density is that of pixel
            space); None: no logit layer. Unused without ``image_shape``.
        seed: seeds the random parts of the construction (the pad permutation, the flows'
            permutations and initial weights), so a config always builds the same model.
    """

    D: int
    d: int
    f_layers: int = 4
    f_hidden: tuple[int, ...] = (64, 64)
    f_coupling: str = "affine"
    h_layers: int = 4
    h_hidden: tuple[int, ...] = (32, 32)
    h_coupling: str = "affine"
    num_bins: int = 8
    image_shape: tuple[int, int, int] | None = None
    image_scales: int = 2
    image_blocks: int = 3
    image_channels: int = 64
    image_res_blocks: int = 2
    logit_alpha: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("D", "d", "f_layers", "h_layers", "num_bins"):
            _positive_int(name, getattr(self, name))
        for name in ("image_scales", "image_blocks", "image_channels"):
            _positive_int(name, getattr(self, name))
        res = self.image_res_blocks
        if isinstance(res, bool) or not isinstance(res, int) or res < 0:
            raise ValueError(f"image_res_blocks must be an integer >= 0, got {res!r}")
        alpha = self.logit_alpha
        if alpha is not None and (
            isinstance(alpha, bool)
            or not isinstance(alpha, int | float)
            or not (math.isfinite(alpha) and 0 <= alpha < 0.5)
        ):
            raise ValueError(f"logit_alpha must be None or a float in [0, 0.5), got {alpha!r}")
        if self.d >= self.D:
            raise ValueError(f"d must be < D, got d={self.d}, D={self.D}")
        for name in ("f_hidden", "h_hidden"):
            widths = tuple(getattr(self, name))
            for i, width in enumerate(widths):
                _positive_int(f"{name}[{i}]", width)
            object.__setattr__(self, name, widths)
        for name in ("f_coupling", "h_coupling"):
            if getattr(self, name) not in COUPLINGS:
                raise ValueError(f"{name} must be one of {COUPLINGS}, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) != 3 or math.prod(shape) != self.D:
                raise ValueError(
                    f"image_shape must be (C, H, W) with C·H·W = D = {self.D}, got {shape}"
                )
            object.__setattr__(self, "image_shape", shape)

    def to_dict(self) -> dict[str, Any]:
        """The config as a dict of plain values (ints, strings, tuples, None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FlowConfig:
        """Build a config from a mapping, raising ``ValueError`` on unknown keys.

        Arguments:
            values: field names to values; missing fields take their defaults.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown FlowConfig option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)
