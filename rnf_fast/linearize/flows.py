"""Explicit linearizations of the library's flows: run a layer once, then push tangents and
cotangents through its cached Jacobian factors; and the decoder of a rectangular flow.

``linearize_flow(layer, x)`` returns ``(y, lin)``: the layer's output and a
:class:`~rnf_fast.linearize.pieces.LayerLinearization` with ``jvp(T)`` (tangents T
(B, K, *in) -> (B, K, *out)) and ``vjp(C)`` (cotangents (B, K, *out) -> (B, K, *in)), batched
over B × K (K is folded into the batch of every GEMM and convolution). The rules live in
``FLOW_RULES``, keyed by exact type, with an ``inverse`` flag; the networks inside the layers
(MLP and convolutional conditioners) take the rules of :mod:`.modules`. A layer without a rule
falls back to ``torch.func`` for that layer only (:class:`~rnf_fast.linearize.generic.FuncLayer`),
so new layers work unchanged, at the generic path's speed.

Called under ``torch.no_grad()`` the cached factors are plain tensors: every matvec is pure
tangent propagation. Called with grad enabled (the differentiable J v of the log-det surrogate)
the same rules build the factors with their graph, so autograd differentiates the explicit chain,
second-derivative terms (σ'', the coupling scales' dependence on x and θ) included.

Couplings share one factorization: with θ (B, m, P) the conditioner outputs of the m transformed
features, the layer caches ``dy_dx`` (B, m) and ``dy_dtheta`` (B, m, P), and
:func:`coupling_tangent` / :func:`coupling_cotangent` are the elementwise steps between them.

:class:`PaddedFlowDecoder` is the decoder z -> flows((z, 0)) of a rectangular flow and
:class:`PaddedFlowLinearization` its linearization.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..flows.base import Compose, Flow, Inverse
from ..flows.coupling import AffineCoupling, Coupling, affine_map
from ..flows.image import (
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    Flatten,
    MultiScale,
    Squeeze,
    Unflatten,
    checkerboard_mask,
)
from ..flows.linear import LULinear, Permutation, Reverse
from ..flows.norm import ActNorm
from ..flows.preprocess import Logit
from ..flows.spline import RationalQuadraticCoupling
from ..ops import coupling_cotangent, coupling_tangent
from .base import Linearization
from .generic import FuncLayer, fallback_layers
from .modules import linearize_module
from .pieces import Chain, Dense, LayerLinearization, Reindex, Scale

__all__ = [
    "FLOW_RULES",
    "PaddedFlowDecoder",
    "PaddedFlowLinearization",
    "coupling_cotangent",
    "coupling_tangent",
    "linearize_flow",
    "pad",
]

FlowRule = Callable[[Flow, Tensor, bool], tuple[Tensor, LayerLinearization]]

FLOW_RULES: dict[type, FlowRule] = {}
"""Flow layer type (exact) -> rule(layer, x, inverse) returning (y, linearization)."""


def _register(*types: type) -> Callable[[FlowRule], FlowRule]:
    def add(rule: FlowRule) -> FlowRule:
        for t in types:
            FLOW_RULES[t] = rule
        return rule

    return add


# --- flow layers ---------------------------------------------------------------------------


def linearize_flow(
    layer: Flow, x: Tensor, *, inverse: bool = False
) -> tuple[Tensor, LayerLinearization]:
    """Run a flow layer (or its inverse) once at x and linearize it.

    Explicit rules: ``Compose``, ``Inverse``, ``AffineCoupling``, ``RationalQuadraticCoupling``,
    ``ActNorm``, ``Permutation``, ``Reverse``, ``LULinear``, ``CheckerboardAffineCoupling``,
    ``ChannelAffineCoupling``, ``Squeeze``, ``Flatten``, ``Unflatten``, ``MultiScale`` and
    ``Logit``, in both directions; any other layer goes through ``torch.func``.

    Arguments:
        layer: the flow layer.
        x: (B, *in) the input of ``layer`` (of ``layer.inverse`` when ``inverse``).
        inverse: linearize ``layer.inverse`` instead of ``layer.forward``.

    Returns:
        (y (B, *out), linearization): y is the first output of the map applied.

    Example:
        >>> from rnf_fast.flows import flat_flow
        >>> flow = flat_flow(4, num_layers=2, hidden=(8,))
        >>> with torch.no_grad():
        ...     y, lin = linearize_flow(flow, torch.randn(3, 4))
        >>> lin.jvp(torch.randn(3, 5, 4)).shape
        torch.Size([3, 5, 4])
    """
    rule = FLOW_RULES.get(type(layer))
    if rule is None or layer._forward_hooks or layer._forward_pre_hooks:
        return _fallback_flow(layer, x, inverse)
    return rule(layer, x, inverse)


def _fallback_flow(layer: Flow, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    apply = layer.inverse if inverse else layer  # calling the layer runs its hooks
    name = f"{type(layer).__name__}{'.inverse' if inverse else ''}"
    return apply(x)[0], FuncLayer(lambda v: apply(v)[0], x, name)


@_register(Compose)
def _compose(flow: Compose, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    parts = []
    for layer in reversed(flow.layers) if inverse else flow.layers:
        x, lin = linearize_flow(layer, x, inverse=inverse)
        parts.append(lin)
    return x, Chain(parts)


@_register(Inverse)
def _inverse_flow(flow: Inverse, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    return linearize_flow(flow.layer, x, inverse=not inverse)


@_register(ActNorm)
def _actnorm(layer: ActNorm, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    y = (layer.inverse if inverse else layer.forward)(x)[0]
    shape = (1, layer.num_features) + (1,) * (x.dim() - 2)
    log_scale = layer.log_scale.view(shape)
    return y, Scale(torch.exp(-log_scale if inverse else log_scale))


@_register(Permutation, Reverse, Squeeze, Flatten, Unflatten)
def _reindex(layer: Flow, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    def forward(v: Tensor) -> Tensor:
        return layer.forward(v)[0]

    def backward(v: Tensor) -> Tensor:
        return layer.inverse(v)[0]

    apply, undo = (backward, forward) if inverse else (forward, backward)
    return apply(x), Reindex(apply, undo)


@_register(LULinear)
def _lu_linear(layer: LULinear, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    if not inverse:
        weight = layer.weight()
        return x @ weight.T + layer.bias, Dense(weight)
    L, U = layer.factors()
    eye = torch.eye(layer.features, dtype=x.dtype, device=x.device)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
    weight_inv = torch.linalg.solve_triangular(U, L_inv, upper=True)
    return (x - layer.bias) @ weight_inv.T, Dense(weight_inv)


def _affine_partials(
    x: Tensor, raw: Tensor, shift: Tensor, clamp: float, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The map of :func:`~rnf_fast.flows.coupling.affine_map` with ∂y/∂x and ∂y/∂(raw, shift)
    stacked on a last axis of 2; the soft clamp's derivative is folded into ∂y/∂raw."""
    terms = affine_map(x, raw, shift, clamp, inverse)
    ds = terms.clamp_slope
    if inverse:
        dy_dtheta = torch.stack([-terms.scaled * ds, -terms.scale], dim=-1)
    else:
        dy_dtheta = torch.stack([terms.scaled * ds, torch.ones_like(terms.scale)], dim=-1)
    return terms.y, terms.scale, dy_dtheta


def _elementwise_partials(
    transform: Callable[[Tensor, Tensor], Tensor], x: Tensor, theta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """y = transform(x, θ) (x (B, m), θ (B, m, P), y[b, i] a function of x[b, i] and θ[b, i]
    only) and its elementwise partials ∂y/∂x (B, m), ∂y/∂θ (B, m, P), from one backward pass of
    Σ y. With grad enabled, the partials keep their graph (create_graph)."""
    graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xl = x if graph and x.requires_grad else x.detach().requires_grad_()
        tl = theta if graph and theta.requires_grad else theta.detach().requires_grad_()
        y = transform(xl, tl)
        dy_dx, dy_dtheta = torch.autograd.grad(
            y.sum(), (xl, tl), create_graph=graph, allow_unused=True, materialize_grads=True
        )
    return (y if graph else y.detach()), dy_dx, dy_dtheta


class _FlatCoupling:
    """y_T = τ(x_T; θ(x_C)), y_C = x_C on (B, n), with cached dy_dx (B, m), dy_dtheta
    (B, m, P) and the conditioner's linearization."""

    def __init__(
        self, layer: Coupling, conditioner: LayerLinearization, dy_dx: Tensor, dy_dtheta: Tensor
    ) -> None:
        self.cond, self.trans = layer.cond_index, layer.trans_index
        self.parts = (conditioner,)
        self.dy_dx, self.dy_dtheta = dy_dx, dy_dtheta

    def jvp(self, T: Tensor) -> Tensor:
        B, K = T.shape[:2]
        dtheta = self.parts[0].jvp(T.index_select(2, self.cond))
        dtheta = dtheta.reshape(B, K, *self.dy_dtheta.shape[1:])
        dy_t = coupling_tangent(T.index_select(2, self.trans), dtheta, self.dy_dx, self.dy_dtheta)
        T, dy_t = _common_dtype(T, dy_t)
        return T.index_copy(2, self.trans, dy_t)

    def vjp(self, C: Tensor) -> Tensor:
        B, K = C.shape[:2]
        dx_t, dtheta = coupling_cotangent(C.index_select(2, self.trans), self.dy_dx, self.dy_dtheta)
        dx_c = self.parts[0].vjp(dtheta.reshape(B, K, -1))
        C, dx_c, dx_t = _common_dtype(C, dx_c, dx_t)
        return C.index_add(2, self.cond, dx_c).index_copy(2, self.trans, dx_t)


def _common_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors in their promoted dtype: under autocast a conditioner's GEMMs give bf16
    where the rest of a coupling's tangents are float32, and index_copy / index_add take one
    dtype."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _coupling_input(layer: Coupling, x: Tensor) -> tuple[Tensor, Tensor, LayerLinearization]:
    """x_T (B, m), θ (B, m, P) and the conditioner's linearization."""
    x_t = x.index_select(1, layer.trans_index)
    theta, conditioner = linearize_module(layer.conditioner, x.index_select(1, layer.cond_index))
    return x_t, theta.view(x.shape[0], x_t.shape[1], layer.params_per_feature), conditioner


@_register(AffineCoupling)
def _affine_coupling(
    layer: AffineCoupling, x: Tensor, inverse: bool
) -> tuple[Tensor, LayerLinearization]:
    x_t, theta, conditioner = _coupling_input(layer, x)
    y_t, dy_dx, dy_dtheta = _affine_partials(
        x_t, theta[..., 0], theta[..., 1], layer.log_scale_clamp, inverse
    )
    y = x.index_copy(1, layer.trans_index, y_t)
    return y, _FlatCoupling(layer, conditioner, dy_dx, dy_dtheta)


@_register(RationalQuadraticCoupling)
def _elementwise_coupling(
    layer: Coupling, x: Tensor, inverse: bool
) -> tuple[Tensor, LayerLinearization]:
    x_t, theta, conditioner = _coupling_input(layer, x)
    y_t, dy_dx, dy_dtheta = _elementwise_partials(
        lambda v, t: layer.transform(v, t, inverse)[0], x_t, theta
    )
    y = x.index_copy(1, layer.trans_index, y_t)
    return y, _FlatCoupling(layer, conditioner, dy_dx, dy_dtheta)


def _pair(theta: Tensor, split: int) -> Tensor:
    """Conditioner output (..., 2·c, height, width) -> (..., c·height·width, 2): raw log-scale
    and shift."""
    lead = theta.shape[: theta.dim() - 3]
    stacked = torch.stack([theta[..., :split, :, :], theta[..., split:, :, :]], dim=-1)
    return stacked.reshape(*lead, -1, 2)


def _unpair(dtheta: Tensor, shape: Sequence[int]) -> Tensor:
    """(B, K, c·height·width, 2) -> (B, K, 2·c, height, width), the transpose of :func:`_pair`."""
    B, K = dtheta.shape[:2]
    parts = dtheta.reshape(B, K, *shape, 2)
    return torch.cat([parts[..., 0], parts[..., 1]], dim=2)


class _Checkerboard:
    """The checkerboard coupling: all channels·height·width entries are 'transformed' (scale 1,
    shift 0 where the mask is 0, folded into dy_dtheta); the conditioner sees x ⊙ keep."""

    def __init__(
        self, keep: Tensor, net: LayerLinearization, dy_dx: Tensor, dy_dtheta: Tensor
    ) -> None:
        self.keep, self.parts = keep, (net,)
        self.dy_dx, self.dy_dtheta = dy_dx, dy_dtheta

    def jvp(self, T: Tensor) -> Tensor:
        B, K, channels, height, width = T.shape
        inp = torch.cat([T * self.keep, T.new_zeros(B, K, 1, height, width)], dim=2)
        dtheta = _pair(self.parts[0].jvp(inp), channels)
        dy = coupling_tangent(T.reshape(B, K, -1), dtheta, self.dy_dx, self.dy_dtheta)
        return dy.reshape(T.shape)

    def vjp(self, C: Tensor) -> Tensor:
        B, K, channels = C.shape[:3]
        dx, dtheta = coupling_cotangent(C.reshape(B, K, -1), self.dy_dx, self.dy_dtheta)
        dinp = self.parts[0].vjp(_unpair(dtheta, C.shape[2:]))
        return dx.reshape(C.shape) + dinp[:, :, :channels] * self.keep


@_register(CheckerboardAffineCoupling)
def _checkerboard(
    layer: CheckerboardAffineCoupling, x: Tensor, inverse: bool
) -> tuple[Tensor, LayerLinearization]:
    B, channels = x.shape[:2]
    mask = checkerboard_mask(x, layer.parity)
    keep = 1 - mask
    theta, net = linearize_module(layer.net, torch.cat([x * keep, keep], dim=1))
    y, dy_dx, dy_dtheta = _affine_partials(
        x, theta[:, :channels] * mask, theta[:, channels:] * mask, layer.log_scale_clamp, inverse
    )
    dy_dtheta = dy_dtheta * mask.unsqueeze(-1)
    flat = dy_dtheta.reshape(B, -1, 2)
    return y, _Checkerboard(keep[:1], net, dy_dx.reshape(B, -1), flat)


class _ChannelCoupling:
    """The channel coupling: the channels ``trans`` are transformed given the channels
    ``cond``; ``cond_first`` says which block comes first in the output."""

    def __init__(
        self,
        cond: slice,
        trans: slice,
        net: LayerLinearization,
        dy_dx: Tensor,
        dy_dtheta: Tensor,
    ) -> None:
        self.cond, self.trans, self.parts = cond, trans, (net,)
        self.cond_first = cond.start == 0
        self.dy_dx, self.dy_dtheta = dy_dx, dy_dtheta

    def _join(self, cond: Tensor, trans: Tensor) -> Tensor:
        return torch.cat([cond, trans] if self.cond_first else [trans, cond], dim=2)

    def jvp(self, T: Tensor) -> Tensor:
        B, K = T.shape[:2]
        t_c, t_t = T[:, :, self.cond], T[:, :, self.trans]
        dtheta = _pair(self.parts[0].jvp(t_c), t_t.shape[2])
        dy = coupling_tangent(t_t.reshape(B, K, -1), dtheta, self.dy_dx, self.dy_dtheta)
        return self._join(t_c, dy.reshape(t_t.shape))

    def vjp(self, C: Tensor) -> Tensor:
        B, K = C.shape[:2]
        c_t = C[:, :, self.trans]
        dx, dtheta = coupling_cotangent(c_t.reshape(B, K, -1), self.dy_dx, self.dy_dtheta)
        dx_c = C[:, :, self.cond] + self.parts[0].vjp(_unpair(dtheta, c_t.shape[2:]))
        return self._join(dx_c, dx.reshape(c_t.shape))


@_register(ChannelAffineCoupling)
def _channel(
    layer: ChannelAffineCoupling, x: Tensor, inverse: bool
) -> tuple[Tensor, LayerLinearization]:
    half = layer.channels // 2
    low, high = slice(0, half), slice(half, layer.channels)
    cond, trans = (low, high) if layer.parity == 0 else (high, low)
    theta, net = linearize_module(layer.net, x[:, cond])
    x_t = x[:, trans]
    m = x_t.shape[1]
    y_t, dy_dx, dy_dtheta = _affine_partials(
        x_t, theta[:, :m], theta[:, m:], layer.log_scale_clamp, inverse
    )
    y = torch.cat([x[:, cond], y_t] if layer.parity == 0 else [y_t, x[:, cond]], dim=1)
    B = x.shape[0]
    flat = dy_dtheta.reshape(B, -1, 2)
    return y, _ChannelCoupling(cond, trans, net, dy_dx.reshape(B, -1), flat)


class _MultiScale:
    """[y[:, :k] flattened, rest(y[:, k:])] after y = layers(x)."""

    def __init__(
        self, layers: LayerLinearization, rest: LayerLinearization, shape: Sequence[int]
    ) -> None:
        self.parts, self.shape = (layers, rest), tuple(shape)

    def jvp(self, T: Tensor) -> Tensor:
        layers, rest = self.parts
        k = self.shape[0] // 2
        Ty = layers.jvp(T)
        return torch.cat([Ty[:, :, :k].flatten(2), rest.jvp(Ty[:, :, k:])], dim=2)

    def vjp(self, C: Tensor) -> Tensor:
        layers, rest = self.parts
        return layers.vjp(_split_scale(C, rest.vjp, self.shape))


class _MultiScaleInverse:
    """The inverse: x = layers⁻¹([y_1 unflattened, rest⁻¹(y_2)])."""

    def __init__(
        self, layers: LayerLinearization, rest: LayerLinearization, shape: Sequence[int]
    ) -> None:
        self.parts, self.shape = (layers, rest), tuple(shape)

    def jvp(self, T: Tensor) -> Tensor:
        layers, rest = self.parts
        return layers.jvp(_split_scale(T, rest.jvp, self.shape))

    def vjp(self, C: Tensor) -> Tensor:
        layers, rest = self.parts
        k = self.shape[0] // 2
        Cv = layers.vjp(C)
        return torch.cat([Cv[:, :, :k].flatten(2), rest.vjp(Cv[:, :, k:])], dim=2)


def _split_scale(T: Tensor, rest: Callable[[Tensor], Tensor], shape: Sequence[int]) -> Tensor:
    """T (B, K, channels·height·width) in the multi-scale layout -> (B, K, channels, height,
    width): the first channels // 2 channels unflattened, the others through ``rest``."""
    B, K = T.shape[:2]
    channels, height, width = shape
    k = channels // 2
    factored = k * height * width
    head = T[:, :, :factored].reshape(B, K, k, height, width)
    return torch.cat([head, rest(T[:, :, factored:])], dim=2)


@_register(MultiScale)
def _multi_scale(layer: MultiScale, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    channels, height, width = layer.shape
    k = channels // 2
    if inverse:
        factored = k * height * width
        r, rest = linearize_flow(layer.rest, x[:, factored:], inverse=True)
        v = torch.cat([x[:, :factored].reshape(-1, k, height, width), r], dim=1)
        y, layers = linearize_flow(layer.layers, v, inverse=True)
        return y, _MultiScaleInverse(layers, rest, layer.shape)
    y, layers = linearize_flow(layer.layers, x)
    z, rest = linearize_flow(layer.rest, y[:, k:])
    return torch.cat([y[:, :k].flatten(1), z], dim=1), _MultiScale(layers, rest, layer.shape)


@_register(Logit)
def _logit(layer: Logit, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    a = layer.alpha
    if inverse:
        s = torch.sigmoid(x)
        return (s - a) / (1 - 2 * a), Scale(s * (1 - s) / (1 - 2 * a))
    p = a + (1 - 2 * a) * x
    return torch.log(p) - torch.log1p(-p), Scale((1 - 2 * a) / (p * (1 - p)))


# --- the decoder of a rectangular flow ------------------------------------------------------


def pad(z: Tensor, D: int) -> Tensor:
    """(z, 0): zeros appended on the last dimension up to width D, (..., d) -> (..., D).

    Example:
        >>> pad(torch.ones(1, 2), 4)
        tensor([[1., 1., 0., 0.]])
    """
    return torch.cat([z, z.new_zeros(*z.shape[:-1], D - z.shape[-1])], dim=-1)


class _Pad:
    """z (B, d) -> (z, 0) (B, D)."""

    def __init__(self, d: int, D: int) -> None:
        self.d, self.D = d, D

    def jvp(self, T: Tensor) -> Tensor:
        return pad(T, self.D)

    def vjp(self, C: Tensor) -> Tensor:
        return C[:, :, : self.d]


def _check_padded(z: Tensor, D: int) -> None:
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor of shape (B, d), got {type(z).__name__}")
    if z.dim() != 2 or z.shape[1] >= D:
        raise ValueError(f"z must be (B, d) with d < D = {D}, got {tuple(z.shape)}")


class PaddedFlowDecoder:
    """The decoder z -> flows[-1](…flows[0]((z, 0))…): (B, d) -> (B, D), with its explicit
    linearization (:meth:`linearize`, which :func:`rnf_fast.linearize` uses).

    Arguments:
        flows: the flow layers applied, in order, to the padded z (B, D).
        D: the padded width, D > d.

    Example:
        >>> from rnf_fast.flows import flat_flow
        >>> decoder = PaddedFlowDecoder((flat_flow(4, num_layers=2, hidden=(8,)),), D=4)
        >>> z = torch.randn(3, 2)
        >>> decoder(z).shape, decoder.linearize(z).path
        (torch.Size([3, 4]), 'explicit')
    """

    def __init__(self, flows: Sequence[Flow], *, D: int) -> None:
        self.flows = tuple(flows)
        self.D = D

    def __call__(self, z: Tensor) -> Tensor:
        """x = flows((z, 0)): z (B, d) -> (B, D)."""
        x = pad(z, self.D)
        for flow in self.flows:
            x, _ = flow(x)
        return x

    def linearize(self, z: Tensor) -> PaddedFlowLinearization:
        """The decoder linearized at z (B, d)."""
        return PaddedFlowLinearization(z, flows=self.flows, D=self.D)


class PaddedFlowLinearization(Linearization):
    """:class:`rnf_fast.Linearization` of the decoder z -> flows[-1](…flows[0]((z, 0))…) at z,
    with every flow linearized explicitly (see :func:`linearize_flow`).

    The decoder runs once at construction, caching each layer's Jacobian factors; ``jvp``,
    ``vjp`` and ``gram_mv`` then only propagate tangents and cotangents. With grad enabled that
    run keeps its graph: the differentiable ``jvp(V, create_graph=True)`` pushes the tangents
    through the same factors instead of running the decoder again, and ``output`` is the
    decoder's output with its graph, for a caller that needs it too (the ML loss's
    reconstruction). Without grad (or where the caller turned it off) the run records none, and
    ``jvp(V, create_graph=True)`` runs the decoder again with the graph.

    Arguments:
        z: (B, d) the point (may require grad).
        flows: the flow layers applied, in order, to the padded z (B, D).
        D: the padded width, D > d.

    Attributes:
        path: ``"explicit"``, or ``"generic"`` when some layer or submodule has no rule and
            goes through ``torch.func`` (its cost is then that of the generic path).
        batching: ``"explicit"``, or ``"explicit+func"`` with such a layer.
        fallback_reason: the layers without a rule, and where vmap failed for one of them the
            first line of its error; None when every layer is explicit.
    """

    path = "explicit"
    batching = "explicit"

    def __init__(self, z: Tensor, *, flows: Sequence[Flow], D: int) -> None:
        _check_padded(z, D)
        self.z = z
        self.flows = tuple(flows)
        self.D = D
        self._graph = torch.is_grad_enabled()
        output, self._lin = self._primal(z if self._graph else z.detach())
        self.out = output.detach()
        self.output = output if self._graph else None
        self._fallbacks = fallback_layers(self._lin)
        if self._fallbacks:
            self.path, self.batching = "generic", "explicit+func"

    @property
    def fallback_reason(self) -> str | None:
        if not self._fallbacks:
            return None
        names = ", ".join(sorted({layer.name for layer in self._fallbacks}))
        reason = f"no explicit rule for {names}: torch.func used there"
        failed = sorted(
            f"{layer.name} ({layer.fallback_reason})"
            for layer in set(self._fallbacks)
            if layer.fallback_reason
        )
        if failed:
            reason += f"; vmap failed, rows repeated: {'; '.join(failed)}"
        return reason

    def _primal(self, z: Tensor) -> tuple[Tensor, Chain]:
        parts: list[LayerLinearization] = [_Pad(z.shape[1], self.D)]
        x = pad(z, self.D)
        for flow in self.flows:
            x, lin = linearize_flow(flow, x)
            parts.append(lin)
        return x, Chain(parts)

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        """J v_k per sample: V (B, K, d) -> (B, K, D); differentiable in z and the flows'
        parameters with ``create_graph``."""
        if not create_graph:
            with torch.no_grad():
                return self._lin.jvp(V)
        with torch.enable_grad():
            if self._graph:
                return self._lin.jvp(V)
            _, lin = self._primal(self.z)
            self._fallbacks += fallback_layers(lin)
            return lin.jvp(V)

    def vjp(self, C: Tensor) -> Tensor:
        """Jᵀ c_k per sample, no graph: C (B, K, D) -> (B, K, d)."""
        with torch.no_grad():
            return self._lin.vjp(C)
