"""Image flows (RealNVP, Dinh et al. 2017): convolutional couplings, squeeze, multi-scale.

Images are (B, C, H, W). ``MultiScale`` factors out half of the channels at each scale and
returns a flat vector, so a multi-scale image flow maps (B, C, H, W) to (B, C·H·W);
``Flatten``/``Unflatten`` let image and flat flows compose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import Flow, check_image, check_input, check_positive, check_shape
from .coupling import affine_map, check_clamp

__all__ = [
    "ChannelAffineCoupling",
    "CheckerboardAffineCoupling",
    "ConvResNet",
    "Flatten",
    "MultiScale",
    "Squeeze",
    "Unflatten",
    "checkerboard_mask",
]

NORMS = ("group", None)


def _conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def _norm(norm: str | None, channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvResNet(nn.Module):
    """A residual convolutional network (B, in, H, W) -> (B, out, H, W), output conv zeroed.

    in-conv 3×3, then ``num_blocks`` residual blocks h + conv(relu(norm(conv(relu(norm(h)))))),
    then relu(norm(·)) and a zero-initialised out-conv 3×3 (so couplings start as the identity).
    Every operation acts on each sample separately (GroupNorm, not BatchNorm), so a flow built on
    it has a per-sample Jacobian.

    Arguments:
        in_channels, out_channels: channels of the input and output.
        hidden_channels: width of the residual stream.
        num_blocks: residual blocks (may be 0).
        norm: ``"group"`` (GroupNorm with gcd(8, hidden_channels) groups) or None.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        hidden_channels: int = 64,
        num_blocks: int = 2,
        norm: str | None = "group",
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        check_positive("hidden_channels", hidden_channels)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        width = hidden_channels
        self.in_conv = _conv3x3(in_channels, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                _norm(norm, width),
                nn.ReLU(),
                _conv3x3(width, width),
                _norm(norm, width),
                nn.ReLU(),
                _conv3x3(width, width),
            )
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(_norm(norm, width), nn.ReLU(), _conv3x3(width, out_channels))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """Evaluate the network: x (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        h = self.in_conv(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def _check_parity(parity: int) -> None:
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")


def _affine(
    x: Tensor, raw: Tensor, shift: Tensor, clamp: float, inverse: bool
) -> tuple[Tensor, Tensor]:
    """:func:`~rnf_fast.flows.coupling.affine_map` with its log|det| summed per sample (B,)."""
    terms = affine_map(x, raw, shift, clamp, inverse)
    return terms.y, terms.log_scale.flatten(1).sum(1)


def checkerboard_mask(x: Tensor, parity: int) -> Tensor:
    """The checkerboard mask of x (B, C, height, width): 1 at the pixels (i, j) with
    (i + j) % 2 == parity (those transformed), else 0, as (B, 1, height, width) in x's dtype.

    Example:
        >>> checkerboard_mask(torch.zeros(1, 3, 2, 3), 0)[0, 0]
        tensor([[1., 0., 1.],
                [0., 1., 0.]])
    """
    batch, _, height, width = x.shape
    i = torch.arange(height, device=x.device).view(height, 1)
    j = torch.arange(width, device=x.device).view(1, width)
    return ((i + j) % 2 == parity).to(x.dtype).expand(batch, 1, height, width)


class CheckerboardAffineCoupling(Flow):
    """RealNVP affine coupling with a spatial checkerboard mask, on (B, C, H, W).

    Pixels (i, j) with (i + j) % 2 == parity are transformed, x · exp(s) + t (all channels), with
    (s, t) from a ``ConvResNet`` that sees the other pixels (zeroed where transformed) and the
    mask itself as an extra channel. s is soft-clamped as in ``AffineCoupling``.

    Arguments:
        channels: C.
        parity: 0 or 1, which half of the checkerboard is transformed.
        hidden_channels, num_blocks, norm: of the ``ConvResNet``.
        log_scale_clamp: s = c · tanh(ŝ / c) with c = log_scale_clamp.
    """

    def __init__(
        self,
        channels: int,
        *,
        parity: int = 0,
        hidden_channels: int = 64,
        num_blocks: int = 2,
        norm: str | None = "group",
        log_scale_clamp: float = 3.0,
    ) -> None:
        super().__init__()
        check_positive("channels", channels)
        _check_parity(parity)
        check_clamp(log_scale_clamp)
        self.channels = channels
        self.parity = parity
        self.log_scale_clamp = float(log_scale_clamp)
        self.net = ConvResNet(
            channels + 1,
            2 * channels,
            hidden_channels=hidden_channels,
            num_blocks=num_blocks,
            norm=norm,
        )

    def _couple(self, x: Tensor, name: str, inverse: bool) -> tuple[Tensor, Tensor]:
        check_image(name, x, self.channels)
        mask = checkerboard_mask(x, self.parity)
        keep = 1 - mask
        params = self.net(torch.cat([x * keep, keep], dim=1))
        C = self.channels
        return _affine(x, params[:, :C] * mask, params[:, C:] * mask, self.log_scale_clamp, inverse)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the coupling: x (B, C, H, W) -> (y (B, C, H, W), logabsdet (B,))."""
        return self._couple(x, "x", inverse=False)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the coupling: y (B, C, H, W) -> (x (B, C, H, W), logabsdet (B,))."""
        return self._couple(y, "y", inverse=True)


class ChannelAffineCoupling(Flow):
    """RealNVP affine coupling that splits the channels in two halves, on (B, C, H, W).

    With a = channels [0, C // 2) and b = channels [C // 2, C): parity 0 transforms b given a,
    parity 1 transforms a given b, by x · exp(s) + t with (s, t) from a ``ConvResNet``.

    Arguments:
        channels: C, at least 2.
        parity: 0 or 1, which half is transformed.
        hidden_channels, num_blocks, norm: of the ``ConvResNet``.
        log_scale_clamp: s = c · tanh(ŝ / c) with c = log_scale_clamp.
    """

    def __init__(
        self,
        channels: int,
        *,
        parity: int = 0,
        hidden_channels: int = 64,
        num_blocks: int = 2,
        norm: str | None = "group",
        log_scale_clamp: float = 3.0,
    ) -> None:
        super().__init__()
        check_positive("channels", channels)
        if channels < 2:
            raise ValueError(f"channels must be >= 2 for a channel coupling, got {channels}")
        _check_parity(parity)
        check_clamp(log_scale_clamp)
        self.channels = channels
        self.parity = parity
        self.log_scale_clamp = float(log_scale_clamp)
        half = channels // 2
        n_cond, n_trans = (half, channels - half) if parity == 0 else (channels - half, half)
        self.net = ConvResNet(
            n_cond, 2 * n_trans, hidden_channels=hidden_channels, num_blocks=num_blocks, norm=norm
        )

    def _couple(self, x: Tensor, name: str, inverse: bool) -> tuple[Tensor, Tensor]:
        check_image(name, x, self.channels)
        a, b = x[:, : self.channels // 2], x[:, self.channels // 2 :]
        cond, trans = (a, b) if self.parity == 0 else (b, a)
        params = self.net(cond)
        m = trans.shape[1]
        out, logabsdet = _affine(trans, params[:, :m], params[:, m:], self.log_scale_clamp, inverse)
        return torch.cat([cond, out] if self.parity == 0 else [out, cond], dim=1), logabsdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the coupling: x (B, C, H, W) -> (y (B, C, H, W), logabsdet (B,))."""
        return self._couple(x, "x", inverse=False)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the coupling: y (B, C, H, W) -> (x (B, C, H, W), logabsdet (B,))."""
        return self._couple(y, "y", inverse=True)


class Squeeze(Flow):
    """Space-to-depth: (B, C, H, W) -> (B, 4C, H/2, W/2), log|det| = 0.

    Output channel 4c + 2p + q holds x[:, c, 2i + p, 2j + q] at (i, j) (RealNVP's squeeze).

    Arguments:
        channels: C of the input.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        check_positive("channels", channels)
        self.channels = channels

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Squeeze: x (B, C, H, W), H and W even -> (y (B, 4C, H/2, W/2), zeros (B,))."""
        check_image("x", x, self.channels)
        batch, channels, height, width = x.shape
        if height % 2 or width % 2:
            raise ValueError(f"x must have even H and W, got {tuple(x.shape)}")
        y = x.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(batch, 4 * channels, height // 2, width // 2), x.new_zeros(batch)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Unsqueeze: y (B, 4C, H/2, W/2) -> (x (B, C, H, W), zeros (B,))."""
        check_image("y", y, 4 * self.channels)
        batch, _, height, width = y.shape
        x = y.reshape(batch, self.channels, 2, 2, height, width).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(batch, self.channels, 2 * height, 2 * width), y.new_zeros(batch)


def _reshape(
    x: Tensor, name: str, source: tuple[int, ...], target: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """x (B, *source) -> ((B, *target), zeros (B,)), checking x's shape under ``name``."""
    check_input(name, x, source)
    return x.reshape(x.shape[0], *target), x.new_zeros(x.shape[0])


class Flatten(Flow):
    """Reshape (B, C, H, W) -> (B, C·H·W), log|det| = 0.

    Arguments:
        shape: (C, H, W) of one sample.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = check_shape(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten: x (B, C, H, W) -> (y (B, C·H·W), zeros (B,))."""
        return _reshape(x, "x", self.shape, (math.prod(self.shape),))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Unflatten: y (B, C·H·W) -> (x (B, C, H, W), zeros (B,))."""
        return _reshape(y, "y", (math.prod(self.shape),), self.shape)


class Unflatten(Flow):
    """Reshape (B, C·H·W) -> (B, C, H, W), log|det| = 0; the inverse of ``Flatten``.

    Arguments:
        shape: (C, H, W) of one sample.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = check_shape(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unflatten: x (B, C·H·W) -> (y (B, C, H, W), zeros (B,))."""
        return _reshape(x, "x", (math.prod(self.shape),), self.shape)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten: y (B, C, H, W) -> (x (B, C·H·W), zeros (B,))."""
        return _reshape(y, "y", self.shape, (math.prod(self.shape),))


class MultiScale(Flow):
    """One RealNVP scale: transform, factor out half of the channels, recurse on the rest.

    forward: (y, ·) = layers(x) with y (B, C, H, W); the first C // 2 channels of y leave the
    flow unchanged and the remaining C - C // 2 go through ``rest``, which must end flat. The
    output is the flat vector

        [ y[:, :C // 2].flatten(1),  rest(y[:, C // 2:]) ]   (B, C·H·W),

    so nesting MultiScale gives [scale-1 factored-out, scale-2 factored-out, …, last scale], each
    block in (channel, row, column) order. ``inverse`` takes that flat vector back to x.

    Arguments:
        layers: the flow of this scale, from the input x to y (B, *shape).
        rest: the flow of the remaining scales, from (B, C - C // 2, H, W) to
            (B, (C - C // 2)·H·W).
        shape: (C, H, W), the shape of one sample of ``layers``' output; C >= 2.
    """

    def __init__(self, layers: Flow, rest: Flow, *, shape: Sequence[int]) -> None:
        super().__init__()
        for name, flow in (("layers", layers), ("rest", rest)):
            if not isinstance(flow, Flow):
                raise TypeError(f"{name} must be a Flow, got {type(flow).__name__}")
        self.shape = check_shape(shape)
        if self.shape[0] < 2:
            raise ValueError(f"shape must have C >= 2 channels to factor out, got {self.shape}")
        self.layers = layers
        self.rest = rest

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the scale: x (B, ...) -> (y (B, C·H·W), logabsdet (B,))."""
        y, logabsdet = self.layers(x)
        check_input("output of layers", y, self.shape)
        channels, height, width = self.shape
        k = channels // 2
        z, ld = self.rest(y[:, k:])
        check_input("output of rest", z, ((channels - k) * height * width,))
        return torch.cat([y[:, :k].flatten(1), z], dim=1), logabsdet + ld

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Invert the scale: y (B, C·H·W) -> (x (B, ...), logabsdet (B,))."""
        channels, height, width = self.shape
        check_input("y", y, (channels * height * width,))
        k = channels // 2
        factored = k * height * width
        rest, ld = self.rest.inverse(y[:, factored:])
        v = torch.cat([y[:, :factored].reshape(-1, k, height, width), rest], dim=1)
        x, logabsdet = self.layers.inverse(v)
        return x, logabsdet + ld
