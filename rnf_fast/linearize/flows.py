"""Explicit linearizations of the library's flows: run a layer once, then push tangents and
cotangents through its cached Jacobian factors.

``linearize_flow(layer, x)`` returns ``(y, lin)``: the layer's output and an object with
``jvp(T)`` (tangents T (B, K, *in) -> (B, K, *out)) and ``vjp(C)`` (cotangents
(B, K, *out) -> (B, K, *in)), batched over B × K (K is folded into the batch of every GEMM and
convolution). The rules live in two registries keyed by exact type: ``FLOW_RULES`` for flow
layers (with an ``inverse`` flag) and ``MODULE_RULES`` for the networks inside them (MLP and
convolutional conditioners). A layer or submodule without a rule falls back to ``torch.func``
for that piece only, so new layers work unchanged, at the generic path's speed.

Called under ``torch.no_grad()`` the cached factors are plain tensors: every matvec is pure
tangent propagation. Called with grad enabled (the differentiable J v of the log-det surrogate)
the same rules build the factors with their graph, so autograd differentiates the explicit chain,
second-derivative terms (σ'', the coupling scales' dependence on x and θ) included.

Couplings share one factorization: with θ (B, m, P) the conditioner outputs of the m transformed
features, the layer caches ``dy_dx`` (B, m) and ``dy_dtheta`` (B, m, P), and
:func:`coupling_tangent` / :func:`coupling_cotangent` are the elementwise steps between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp as _func_jvp
from torch.func import vjp as _func_vjp
from torch.func import vmap

from ..flows.base import Compose, Flow, Inverse
from ..flows.coupling import MLP, AffineCoupling, Coupling
from ..flows.image import (
    ChannelAffineCoupling,
    CheckerboardAffineCoupling,
    ConvResNet,
    Flatten,
    MultiScale,
    Squeeze,
    Unflatten,
)
from ..flows.linear import LULinear, Permutation, Reverse
from ..flows.norm import ActNorm
from ..flows.preprocess import Logit
from ..flows.spline import RationalQuadraticCoupling
from ..kernels import coupling_cotangent, coupling_tangent, scaled_linear
from .modules import _derivative

__all__ = [
    "FLOW_RULES",
    "MODULE_RULES",
    "LayerLinearization",
    "PaddedFlowLinearization",
    "coupling_cotangent",
    "coupling_tangent",
    "func_fallbacks",
    "linearize_flow",
    "linearize_module",
]


class LayerLinearization(Protocol):
    """One layer linearized at its input x (B, *in), output y (B, *out)."""

    def jvp(self, T: Tensor) -> Tensor:
        """J t_k per sample: T (B, K, *in) -> (B, K, *out)."""
        ...

    def vjp(self, C: Tensor) -> Tensor:
        """Jᵀ c_k per sample: C (B, K, *out) -> (B, K, *in)."""
        ...


FlowRule = Callable[[Flow, Tensor, bool], tuple[Tensor, LayerLinearization]]
ModuleRule = Callable[[nn.Module, Tensor], tuple[Tensor, LayerLinearization]]

FLOW_RULES: dict[type, FlowRule] = {}
"""Flow layer type -> rule(layer, x, inverse) returning (y, linearization)."""

MODULE_RULES: dict[type, ModuleRule] = {}
"""Network module type -> rule(module, x) returning (y, linearization)."""


def _register(registry: dict, *types: type) -> Callable:
    def add(rule: Callable) -> Callable:
        for t in types:
            registry[t] = rule
        return rule

    return add


# --- generic linear pieces -----------------------------------------------------------------


def _fold(T: Tensor) -> Tensor:
    """(B, K, *s) -> (B·K, *s)."""
    return T.reshape(T.shape[0] * T.shape[1], *T.shape[2:])


def _unfold(Y: Tensor, like: Tensor) -> Tensor:
    """(B·K, *s) -> (B, K, *s), with B and K taken from ``like`` (B, K, ...)."""
    return Y.reshape(like.shape[0], like.shape[1], *Y.shape[1:])


class _Chain:
    """The composition parts[-1] ∘ … ∘ parts[0]."""

    def __init__(self, parts: Sequence[LayerLinearization]) -> None:
        self.parts = tuple(parts)

    def jvp(self, T: Tensor) -> Tensor:
        for part in self.parts:
            T = part.jvp(T)
        return T

    def vjp(self, C: Tensor) -> Tensor:
        for part in reversed(self.parts):
            C = part.vjp(C)
        return C


class _Residual:
    """t -> t + J_block t (a residual block h + block(h))."""

    def __init__(self, block: LayerLinearization) -> None:
        self.parts = (block,)

    def jvp(self, T: Tensor) -> Tensor:
        return T + self.parts[0].jvp(T)

    def vjp(self, C: Tensor) -> Tensor:
        return C + self.parts[0].vjp(C)


class _Scale:
    """A diagonal Jacobian: scale (B, *s) or broadcastable to it (per sample or shared)."""

    def __init__(self, scale: Tensor) -> None:
        self.scale = scale

    def jvp(self, T: Tensor) -> Tensor:
        return T * self.scale.unsqueeze(1)

    def vjp(self, C: Tensor) -> Tensor:
        return C * self.scale.unsqueeze(1)


class _Dense:
    """x -> (x Wᵀ) ⊙ s on the last dimension: W (n_out, n_in), s (B, n_out) or None (the
    derivative of an activation right after the layer, fused into one ``scaled_linear``)."""

    def __init__(self, weight: Tensor, scale: Tensor | None = None) -> None:
        self.weight, self.scale = weight, scale

    def jvp(self, T: Tensor) -> Tensor:
        return scaled_linear(T, self.weight, self.scale)

    def vjp(self, C: Tensor) -> Tensor:
        return scaled_linear(C, self.weight, self.scale, transpose=True)


class _Reindex:
    """A permutation of the entries of each sample (its transpose is its inverse), applied as
    the layer's own forward and inverse on the folded batch."""

    def __init__(self, apply: Callable[[Tensor], Tensor], undo: Callable[[Tensor], Tensor]):
        self.apply, self.undo = apply, undo

    def jvp(self, T: Tensor) -> Tensor:
        return _unfold(self.apply(_fold(T)), T)

    def vjp(self, C: Tensor) -> Tensor:
        return _unfold(self.undo(_fold(C)), C)


class _Func:
    """``torch.func`` linearization of one piece ``fn`` (B, *in) -> (B, *out) at x.

    J t: ``torch.func.jvp`` vmapped over the K tangents (with grad enabled, differentiable in
    x and fn's parameters); Jᵀ c: one ``torch.func.vjp`` closure, built on first use and
    vmapped over K. When vmap cannot handle ``fn``, x is repeated K times along the batch
    instead.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor, what: str) -> None:
        self.fn, self.x, self.what = fn, x, what
        self.vmappable = True
        self._vjp: tuple[int | None, Callable] | None = None

    def _repeat(self, K: int) -> Tensor:
        return self.x.repeat_interleave(K, dim=0)

    def jvp(self, T: Tensor) -> Tensor:
        if self.vmappable:
            try:
                one = lambda t: _func_jvp(self.fn, (self.x,), (t,))[1]  # noqa: E731
                return vmap(one, in_dims=1, out_dims=1, randomness="same")(T)
            except Exception:  # vmap's failures are RuntimeError, NotImplementedError, ...
                self.vmappable = False
        _, out = _func_jvp(self.fn, (self._repeat(T.shape[1]),), (_fold(T),))
        return _unfold(out, T)

    def vjp(self, C: Tensor) -> Tensor:
        K = None if self.vmappable else C.shape[1]
        if self._vjp is None or self._vjp[0] != K:
            x = self.x.detach() if K is None else self._repeat(K).detach()
            self._vjp = (K, _func_vjp(self.fn, x)[1])
        fn = self._vjp[1]
        if K is None:
            try:
                return vmap(lambda c: fn(c)[0], in_dims=1, out_dims=1)(C)
            except Exception:  # as in jvp: fall back to repeating x
                self.vmappable, self._vjp = False, None
                return self.vjp(C)
        return _unfold(fn(_fold(C))[0], C)


def func_fallbacks(lin: object) -> list[str]:
    """Names of the pieces of a linearization that went through the ``torch.func`` fallback."""
    if isinstance(lin, _Func):
        return [lin.what]
    return [name for part in getattr(lin, "parts", ()) for name in func_fallbacks(part)]


# --- networks inside the layers ------------------------------------------------------------


def linearize_module(module: nn.Module, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    """Run a network module once at x and linearize it.

    Explicit rules: ``nn.Linear``, ``nn.Conv2d`` (zero padding), ``nn.GroupNorm``,
    ``nn.Identity``, the elementwise activations of :mod:`rnf_fast.linearize.modules`,
    ``nn.Sequential``, :class:`~rnf_fast.flows.MLP` and :class:`~rnf_fast.flows.ConvResNet`;
    anything else (or a module with hooks) goes through ``torch.func``.

    Arguments:
        module: maps (B, *in) to (B, *out), rows independent.
        x: (B, *in) its input.

    Returns:
        (y (B, *out), linearization).
    """
    rule = MODULE_RULES.get(type(module))
    if rule is None and _derivative(module) is not None:
        rule = _activation
    if rule is None or module._forward_hooks or module._forward_pre_hooks:
        return module(x), _Func(module, x, type(module).__name__)
    return rule(module, x)


def _activate(act: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """σ(a) and σ'(a); tanh's derivative comes from its output, 1 - σ(a)², saving a tanh."""
    if type(act) is nn.Tanh:
        y = torch.tanh(a)
        return y, 1 - y * y
    return act(a), _derivative(act)(a)


def _activation(module: nn.Module, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    y, slope = _activate(module, x)
    return y, _Scale(slope)


@_register(MODULE_RULES, nn.Identity)
def _identity(module: nn.Identity, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    return x, _Chain(())


@_register(MODULE_RULES, nn.Linear)
def _linear(module: nn.Linear, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    return module(x), _Dense(module.weight)


@_register(MODULE_RULES, nn.Sequential)
def _sequential(module: nn.Sequential, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    parts = []
    for child in module:
        x, lin = linearize_module(child, x)
        parts.append(lin)
    return x, _Chain(parts)


@_register(MODULE_RULES, MLP)
def _mlp(mlp: MLP, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    if _derivative(mlp.act) is None or mlp.act._forward_hooks or mlp.act._forward_pre_hooks:
        return mlp(x), _Func(mlp, x, "MLP")
    parts: list[LayerLinearization] = []
    for linear in mlp.linears[:-1]:
        x, slope = _activate(mlp.act, linear(x))
        parts.append(_Dense(linear.weight, slope))
    last = mlp.linears[-1]
    return last(x), _Chain([*parts, _Dense(last.weight)])


class _Conv:
    """The tangent of a 2-d convolution is the convolution without bias; its transpose is the
    transposed convolution."""

    def __init__(self, conv: nn.Conv2d, in_size: Sequence[int]) -> None:
        self.conv, self.in_size = conv, tuple(in_size)

    def jvp(self, T: Tensor) -> Tensor:
        c = self.conv
        out = F.conv2d(_fold(T), c.weight, None, c.stride, c.padding, c.dilation, c.groups)
        return _unfold(out, T)

    def vjp(self, C: Tensor) -> Tensor:
        c = self.conv
        size = (C.shape[0] * C.shape[1], *self.in_size)
        out = nn.grad.conv2d_input(
            size, c.weight, _fold(C), c.stride, c.padding, c.dilation, c.groups
        )
        return _unfold(out, C)


@_register(MODULE_RULES, nn.Conv2d)
def _conv2d(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv(x), _Func(conv, x, "Conv2d")
    return conv(x), _Conv(conv, x.shape[1:])


class _GroupNorm:
    """GroupNorm's Jacobian per group: γ ⊙ (t - mean(t) - x̂ mean(x̂ ⊙ t)) / σ (symmetric part
    between the γ scalings)."""

    def __init__(self, xhat: Tensor, inv_std: Tensor, weight: Tensor | None, groups: int):
        self.xhat, self.inv_std, self.weight, self.groups = xhat, inv_std, weight, groups

    def _project(self, T: Tensor) -> Tensor:
        B, K = T.shape[:2]
        t = T.reshape(B, K, self.groups, -1)
        xhat = self.xhat.unsqueeze(1)
        mean_t = t.mean(-1, keepdim=True)
        mean_xt = (xhat * t).mean(-1, keepdim=True)
        return ((t - mean_t - xhat * mean_xt) * self.inv_std.unsqueeze(1)).reshape(T.shape)

    def _gamma(self, T: Tensor) -> Tensor:
        if self.weight is None:
            return T
        return T * self.weight.view(-1, *([1] * (T.dim() - 3)))

    def jvp(self, T: Tensor) -> Tensor:
        return self._gamma(self._project(T))

    def vjp(self, C: Tensor) -> Tensor:
        return self._project(self._gamma(C))


@_register(MODULE_RULES, nn.GroupNorm)
def _group_norm(gn: nn.GroupNorm, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    B, G = x.shape[0], gn.num_groups
    xg = x.reshape(B, G, -1)
    centred = xg - xg.mean(-1, keepdim=True)
    inv_std = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + gn.eps)
    xhat = centred * inv_std
    y = xhat.reshape(x.shape)
    if gn.affine:
        shape = (-1, *([1] * (x.dim() - 2)))
        y = y * gn.weight.view(shape) + gn.bias.view(shape)
    return y, _GroupNorm(xhat, inv_std, gn.weight if gn.affine else None, G)


@_register(MODULE_RULES, ConvResNet)
def _conv_resnet(net: ConvResNet, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    h, first = linearize_module(net.in_conv, x)
    parts = [first]
    for block in net.blocks:
        r, lin = linearize_module(block, h)
        h = h + r
        parts.append(_Residual(lin))
    y, last = linearize_module(net.out, h)
    return y, _Chain([*parts, last])


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
    """
    rule = FLOW_RULES.get(type(layer))
    if rule is None or layer._forward_hooks or layer._forward_pre_hooks:
        return _fallback_flow(layer, x, inverse)
    return rule(layer, x, inverse)


def _fallback_flow(layer: Flow, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    apply = layer.inverse if inverse else layer  # calling the layer runs its hooks
    name = f"{type(layer).__name__}{'.inverse' if inverse else ''}"
    return apply(x)[0], _Func(lambda v: apply(v)[0], x, name)


@_register(FLOW_RULES, Compose)
def _compose(flow: Compose, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    parts = []
    for layer in reversed(flow.layers) if inverse else flow.layers:
        x, lin = linearize_flow(layer, x, inverse=inverse)
        parts.append(lin)
    return x, _Chain(parts)


@_register(FLOW_RULES, Inverse)
def _inverse(flow: Inverse, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    return linearize_flow(flow.layer, x, inverse=not inverse)


@_register(FLOW_RULES, ActNorm)
def _actnorm(layer: ActNorm, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    y = (layer.inverse if inverse else layer.forward)(x)[0]
    shape = (1, layer.num_features) + (1,) * (x.dim() - 2)
    log_scale = layer.log_scale.view(shape)
    return y, _Scale(torch.exp(-log_scale if inverse else log_scale))


@_register(FLOW_RULES, Permutation, Reverse, Squeeze, Flatten, Unflatten)
def _reindex(layer: Flow, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    def forward(v: Tensor) -> Tensor:
        return layer.forward(v)[0]

    def backward(v: Tensor) -> Tensor:
        return layer.inverse(v)[0]

    apply, undo = (backward, forward) if inverse else (forward, backward)
    return apply(x), _Reindex(apply, undo)


@_register(FLOW_RULES, LULinear)
def _lu_linear(layer: LULinear, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    if not inverse:
        W = layer.weight()
        return x @ W.T + layer.bias, _Dense(W)
    L, U = layer.factors()
    eye = torch.eye(layer.features, dtype=x.dtype, device=x.device)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
    W_inv = torch.linalg.solve_triangular(U, L_inv, upper=True)
    return (x - layer.bias) @ W_inv.T, _Dense(W_inv)


def _affine_partials(
    x: Tensor, raw: Tensor, shift: Tensor, clamp: float, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """y = x · exp(s) + shift with s = clamp · tanh(raw / clamp) (or the inverse), elementwise,
    with ∂y/∂x and ∂y/∂(raw, shift) stacked on a last axis of 2; the soft clamp's derivative
    is folded into ∂y/∂raw."""
    th = torch.tanh(raw / clamp)
    ds = 1 - th * th
    if inverse:
        e = torch.exp(-clamp * th)
        y = (x - shift) * e
        return y, e, torch.stack([-y * ds, -e], dim=-1)
    e = torch.exp(clamp * th)
    xe = x * e
    return xe + shift, e, torch.stack([xe * ds, torch.ones_like(e)], dim=-1)


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
        return T.index_copy(2, self.trans, dy_t)

    def vjp(self, C: Tensor) -> Tensor:
        B, K = C.shape[:2]
        dx_t, dtheta = coupling_cotangent(C.index_select(2, self.trans), self.dy_dx, self.dy_dtheta)
        dx_c = self.parts[0].vjp(dtheta.reshape(B, K, -1))
        return C.index_add(2, self.cond, dx_c).index_copy(2, self.trans, dx_t)


def _coupling_input(layer: Coupling, x: Tensor) -> tuple[Tensor, Tensor, LayerLinearization]:
    """x_T (B, m), θ (B, m, P) and the conditioner's linearization."""
    x_t = x.index_select(1, layer.trans_index)
    theta, conditioner = linearize_module(layer.conditioner, x.index_select(1, layer.cond_index))
    return x_t, theta.view(x.shape[0], x_t.shape[1], layer.params_per_feature), conditioner


@_register(FLOW_RULES, AffineCoupling)
def _affine_coupling(
    layer: AffineCoupling, x: Tensor, inverse: bool
) -> tuple[Tensor, LayerLinearization]:
    x_t, theta, conditioner = _coupling_input(layer, x)
    y_t, dy_dx, dy_dtheta = _affine_partials(
        x_t, theta[..., 0], theta[..., 1], layer.log_scale_clamp, inverse
    )
    y = x.index_copy(1, layer.trans_index, y_t)
    return y, _FlatCoupling(layer, conditioner, dy_dx, dy_dtheta)


@_register(FLOW_RULES, RationalQuadraticCoupling)
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
    """Conditioner output (..., 2·c, H, W) -> (..., c·H·W, 2): raw log-scale and shift."""
    lead = theta.shape[: theta.dim() - 3]
    stacked = torch.stack([theta[..., :split, :, :], theta[..., split:, :, :]], dim=-1)
    return stacked.reshape(*lead, -1, 2)


def _unpair(dtheta: Tensor, shape: Sequence[int]) -> Tensor:
    """(B, K, c·H·W, 2) -> (B, K, 2·c, H, W), the transpose of :func:`_pair`."""
    B, K = dtheta.shape[:2]
    parts = dtheta.reshape(B, K, *shape, 2)
    return torch.cat([parts[..., 0], parts[..., 1]], dim=2)


class _Checkerboard:
    """The checkerboard coupling: all C·H·W entries are 'transformed' (scale 1, shift 0 where
    the mask is 0, folded into dy_dtheta); the conditioner sees x ⊙ keep."""

    def __init__(
        self, keep: Tensor, net: LayerLinearization, dy_dx: Tensor, dy_dtheta: Tensor
    ) -> None:
        self.keep, self.parts = keep, (net,)
        self.dy_dx, self.dy_dtheta = dy_dx, dy_dtheta

    def jvp(self, T: Tensor) -> Tensor:
        B, K, C, H, W = T.shape
        inp = torch.cat([T * self.keep, T.new_zeros(B, K, 1, H, W)], dim=2)
        dtheta = _pair(self.parts[0].jvp(inp), C)
        dy = coupling_tangent(T.reshape(B, K, -1), dtheta, self.dy_dx, self.dy_dtheta)
        return dy.reshape(T.shape)

    def vjp(self, Cot: Tensor) -> Tensor:
        B, K, C, H, W = Cot.shape
        dx, dtheta = coupling_cotangent(Cot.reshape(B, K, -1), self.dy_dx, self.dy_dtheta)
        dinp = self.parts[0].vjp(_unpair(dtheta, (C, H, W)))
        return dx.reshape(Cot.shape) + dinp[:, :, :C] * self.keep


@_register(FLOW_RULES, CheckerboardAffineCoupling)
def _checkerboard(
    layer: CheckerboardAffineCoupling, x: Tensor, inverse: bool
) -> tuple[Tensor, LayerLinearization]:
    B, C, H, W = x.shape
    i = torch.arange(H, device=x.device).view(H, 1)
    j = torch.arange(W, device=x.device).view(1, W)
    mask = ((i + j) % 2 == layer.parity).to(x.dtype).expand(B, 1, H, W)
    keep = 1 - mask
    theta, net = linearize_module(layer.net, torch.cat([x * keep, keep], dim=1))
    y, dy_dx, dy_dtheta = _affine_partials(
        x, theta[:, :C] * mask, theta[:, C:] * mask, layer.log_scale_clamp, inverse
    )
    dy_dtheta = dy_dtheta * mask.unsqueeze(-1)
    flat = dy_dtheta.reshape(B, C * H * W, 2)
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


@_register(FLOW_RULES, ChannelAffineCoupling)
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
    """T (B, K, C·H·W) in the multi-scale layout -> (B, K, C, H, W): the first C // 2 channels
    unflattened, the others through ``rest``."""
    B, K = T.shape[:2]
    C, H, W = shape
    k = C // 2
    head = T[:, :, : k * H * W].reshape(B, K, k, H, W)
    return torch.cat([head, rest(T[:, :, k * H * W :])], dim=2)


@_register(FLOW_RULES, MultiScale)
def _multi_scale(layer: MultiScale, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    C, H, W = layer.shape
    k = C // 2
    if inverse:
        r, rest = linearize_flow(layer.rest, x[:, k * H * W :], inverse=True)
        v = torch.cat([x[:, : k * H * W].reshape(-1, k, H, W), r], dim=1)
        y, layers = linearize_flow(layer.layers, v, inverse=True)
        return y, _MultiScaleInverse(layers, rest, layer.shape)
    y, layers = linearize_flow(layer.layers, x)
    z, rest = linearize_flow(layer.rest, y[:, k:])
    return torch.cat([y[:, :k].flatten(1), z], dim=1), _MultiScale(layers, rest, layer.shape)


@_register(FLOW_RULES, Logit)
def _logit(layer: Logit, x: Tensor, inverse: bool) -> tuple[Tensor, LayerLinearization]:
    a = layer.alpha
    if inverse:
        s = torch.sigmoid(x)
        return (s - a) / (1 - 2 * a), _Scale(s * (1 - s) / (1 - 2 * a))
    p = a + (1 - 2 * a) * x
    return torch.log(p) - torch.log1p(-p), _Scale((1 - 2 * a) / (p * (1 - p)))


# --- the decoder of a rectangular flow ------------------------------------------------------


class _Pad:
    """z (B, d) -> (z, 0) (B, D)."""

    def __init__(self, d: int, D: int) -> None:
        self.d, self.D = d, D

    def jvp(self, T: Tensor) -> Tensor:
        B, K = T.shape[:2]
        return torch.cat([T, T.new_zeros(B, K, self.D - self.d)], dim=2)

    def vjp(self, C: Tensor) -> Tensor:
        return C[:, :, : self.d]


class PaddedFlowLinearization:
    """:class:`rnf_fast.Linearization` of the decoder z -> flows[-1](…flows[0]((z, 0))…) at z,
    with every flow linearized explicitly (see :func:`linearize_flow`).

    The decoder runs once at construction (no graph), caching each layer's Jacobian factors;
    ``jvp``, ``vjp`` and ``gram_mv`` then only propagate tangents and cotangents. The
    differentiable ``jvp(V, create_graph=True)`` re-runs the decoder once with the graph and
    pushes the tangents through the same rules.

    Arguments:
        z: (B, d) the point (may require grad).
        flows: the flow layers applied, in order, to the padded z (B, D).
        D: the padded width, D > d.

    Attributes:
        batching: ``"explicit"``, or ``"explicit+func"`` when some layer or submodule has no
            rule and goes through ``torch.func`` (listed in ``fallback_reason``).
    """

    def __init__(self, z: Tensor, *, flows: Sequence[Flow], D: int) -> None:
        if z.dim() != 2 or z.shape[1] >= D:
            raise ValueError(f"z must be (B, d) with d < D = {D}, got {tuple(z.shape)}")
        self.z = z
        self.flows = tuple(flows)
        self.D = D
        with torch.no_grad():
            self.out, self._lin = self._primal(z.detach())
        fallbacks = sorted(set(func_fallbacks(self._lin)))
        self.batching = "explicit+func" if fallbacks else "explicit"
        self.fallback_reason = (
            f"no explicit rule for {', '.join(fallbacks)}: torch.func used there"
            if fallbacks
            else None
        )

    def _primal(self, z: Tensor) -> tuple[Tensor, _Chain]:
        parts: list[LayerLinearization] = [_Pad(z.shape[1], self.D)]
        x = torch.cat([z, z.new_zeros(z.shape[0], self.D - z.shape[1])], dim=1)
        for flow in self.flows:
            x, lin = linearize_flow(flow, x)
            parts.append(lin)
        return x, _Chain(parts)

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        """J v_k per sample: V (B, K, d) -> (B, K, D); differentiable in z and the flows'
        parameters with ``create_graph``."""
        if not create_graph:
            with torch.no_grad():
                return self._lin.jvp(V)
        with torch.enable_grad():
            _, lin = self._primal(self.z)
            return lin.jvp(V)

    def vjp(self, W: Tensor) -> Tensor:
        """Jᵀ w_k per sample, no graph: W (B, K, D) -> (B, K, d)."""
        with torch.no_grad():
            return self._lin.vjp(W)

    def gram_mv(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """(J v_k, Jᵀ J v_k), no graph: V (B, K, d) -> ((B, K, D), (B, K, d))."""
        JV = self.jvp(V)
        return JV, self.vjp(JV)
