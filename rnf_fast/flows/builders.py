"""Ready-made square flows: a flat coupling flow on R^n, a multi-scale RealNVP on images, and the
decoder-side image flow f of a rectangular flow (RealNVP read backwards, logit⁻¹ last)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Compose, Flow, Inverse, check_positive, check_shape
from .coupling import AffineCoupling
from .image import (
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    Flatten,
    MultiScale,
    Squeeze,
    Unflatten,
)
from .linear import LULinear, Permutation
from .norm import ActNorm
from .preprocess import Logit
from .spline import RationalQuadraticCoupling

__all__ = ["flat_flow", "image_decoder", "image_flow"]

COUPLINGS = ("affine", "spline")


def flat_flow(
    n: int,
    *,
    num_layers: int = 4,
    hidden: Sequence[int] = (64, 64),
    coupling: str = "affine",
    activation: str = "tanh",
    actnorm: bool = True,
    lu: bool = True,
    num_bins: int = 8,
    bound: float = 3.0,
    log_scale_clamp: float = 3.0,
    generator: torch.Generator | None = None,
) -> Compose:
    """A coupling flow on R^n: ``num_layers`` × [ActNorm, Permutation, LULinear, coupling].

    Each coupling transforms the last n - n // 2 of its inputs; the random permutation before it
    changes which features those are, and the LU layer (identity at start) learns to mix them.

    Arguments:
        n: the dimension, at least 2.
        num_layers: number of couplings.
        hidden, activation: of each coupling's conditioner ``MLP``.
        coupling: ``"affine"`` (``AffineCoupling``) or ``"spline"``
            (``RationalQuadraticCoupling``).
        actnorm, lu: include the ``ActNorm`` and ``LULinear`` layers.
        num_bins, bound: of the spline couplings.
        log_scale_clamp: of the affine couplings.
        generator: source of the random permutations (the global generator when None).

    Returns:
        A ``Compose`` from (B, n) to (B, n).
    """
    check_positive("n", n)
    if n < 2:
        raise ValueError(f"n must be >= 2 for a coupling flow, got {n}")
    check_positive("num_layers", num_layers)
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
    layers: list[Flow] = []
    for _ in range(num_layers):
        if actnorm:
            layers.append(ActNorm(n))
        layers.append(Permutation(n, generator=generator))
        if lu:
            layers.append(LULinear(n))
        if coupling == "affine":
            layers.append(
                AffineCoupling(
                    n, hidden=hidden, activation=activation, log_scale_clamp=log_scale_clamp
                )
            )
        else:
            layers.append(
                RationalQuadraticCoupling(
                    n, hidden=hidden, activation=activation, num_bins=num_bins, bound=bound
                )
            )
    return Compose(*layers)


def image_flow(
    shape: Sequence[int],
    *,
    num_scales: int = 2,
    blocks_per_scale: int = 3,
    channels: int = 64,
    num_res_blocks: int = 2,
    norm: str | None = "group",
    actnorm: bool = True,
    log_scale_clamp: float = 3.0,
) -> Compose:
    """The multi-scale RealNVP of the rectangular-flows paper, as a flow from R^D to R^D.

    Each scale but the last: ``blocks_per_scale`` checkerboard couplings (alternating parity),
    a squeeze (C, H, W) -> (4C, H/2, W/2), ``blocks_per_scale`` channel couplings (alternating
    parity), then half of the 4C channels are factored out (``MultiScale``). The last scale:
    ``blocks_per_scale + 1`` checkerboard couplings (RealNVP's 3 then 4). With ``actnorm``, a
    per-channel ``ActNorm`` precedes every coupling.

    The input is flat x (B, D), D = C·H·W, read as (B, C, H, W); the output is flat too, laid
    out as ``MultiScale`` documents: [scale-1 factored-out channels, scale-2 …, last scale].

    Arguments:
        shape: (C, H, W); H and W divisible by 2^(num_scales - 1).
        num_scales: number of scales.
        blocks_per_scale: couplings per stage (see above).
        channels: hidden channels of each coupling's ``ConvResNet``.
        num_res_blocks, norm: residual blocks and normalisation of each ``ConvResNet``.
        actnorm: include the ``ActNorm`` layers.
        log_scale_clamp: of the affine couplings.

    Returns:
        A ``Compose`` from (B, C·H·W) to (B, C·H·W).
    """
    image_channels, height, width = check_shape(shape)
    check_positive("num_scales", num_scales)
    check_positive("blocks_per_scale", blocks_per_scale)
    factor = 2 ** (num_scales - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"shape must have H and W divisible by 2**(num_scales - 1) = {factor}, "
            f"got {tuple(shape)}"
        )

    def stage(
        kind: type[CheckerboardAffineCoupling | ChannelAffineCoupling], c: int, count: int
    ) -> list[Flow]:
        layers: list[Flow] = []
        for i in range(count):
            if actnorm:
                layers.append(ActNorm(c))
            coupling = kind(
                c,
                parity=i % 2,
                hidden_channels=channels,
                num_blocks=num_res_blocks,
                norm=norm,
                log_scale_clamp=log_scale_clamp,
            )
            layers.append(coupling)
        return layers

    def scale(c: int, h: int, w: int, remaining: int) -> Flow:
        if remaining == 1:
            last = stage(CheckerboardAffineCoupling, c, blocks_per_scale + 1)
            return Compose(*last, Flatten((c, h, w)))
        layers = stage(CheckerboardAffineCoupling, c, blocks_per_scale)
        layers.append(Squeeze(c))
        layers += stage(ChannelAffineCoupling, 4 * c, blocks_per_scale)
        # MultiScale factors out 4c // 2 channels; the other 2c continue.
        rest = scale(2 * c, h // 2, w // 2, remaining - 1)
        return MultiScale(Compose(*layers), rest, shape=(4 * c, h // 2, w // 2))

    return Compose(
        Unflatten((image_channels, height, width)),
        scale(image_channels, height, width, num_scales),
    )


def image_decoder(
    shape: Sequence[int],
    *,
    logit_alpha: float | None = 1e-6,
    num_scales: int = 2,
    blocks_per_scale: int = 3,
    channels: int = 64,
    num_res_blocks: int = 2,
    norm: str | None = "group",
    actnorm: bool = True,
    log_scale_clamp: float = 3.0,
) -> Inverse:
    """The square flow f of a rectangular flow on images, oriented as the decoder.

    The normalising direction (``f.inverse``, data to latent) reads x (B, D) as the image
    (B, C, H, W) of dequantised pixels, applies ``Logit(alpha=logit_alpha)`` and then the
    multi-scale RealNVP of :func:`image_flow`, so the convolutions see the data as an image and
    the output is the flat multi-scale layout that the padding lives in. ``f.forward`` (the
    decoder side) runs it backwards and ends with the logit's inverse, a scaled sigmoid:

        f = (Logit ∘ image_flow⁻¹ ... )⁻¹,   f(y) = logit⁻¹(image_flow⁻¹(y)),

    so ``g = logit⁻¹ ∘ image_flow⁻¹ ∘ pad``, and J, log det(JᵀJ) and the density on the manifold
    are those of pixel space. ``logit_alpha=None`` leaves the logit out (f then works directly in
    the units of the data).

    Arguments:
        shape: (C, H, W) of one image.
        logit_alpha: α of the logit layer, or None for no logit layer.
        num_scales, blocks_per_scale, channels, num_res_blocks, norm, actnorm, log_scale_clamp:
            of :func:`image_flow`.

    Returns:
        An ``Inverse`` flow from (B, C·H·W) to (B, C·H·W); its ``layer`` is the normalising
        flow ``Compose(Logit, image_flow)`` (or the bare ``image_flow`` without a logit).
    """
    core = image_flow(
        shape,
        num_scales=num_scales,
        blocks_per_scale=blocks_per_scale,
        channels=channels,
        num_res_blocks=num_res_blocks,
        norm=norm,
        actnorm=actnorm,
        log_scale_clamp=log_scale_clamp,
    )
    if logit_alpha is None:
        return Inverse(core)
    return Inverse(Compose(Logit(alpha=logit_alpha), core))
