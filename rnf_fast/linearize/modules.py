"""Explicit linearization of networks: ``nn.Linear``, elementwise activations, ``nn.Sequential``,
convolutions, GroupNorm, and the flows' MLP and ConvResNet conditioners; and of plain MLP
decoders (:class:`SequentialLinearization`).

One rule set serves both uses. :func:`linearize_module` runs a module once at x, caching what its
Jacobian needs (each activation's derivative σ'(a) (B, n)); a Linear followed by an activation
becomes one fused ``scaled_linear`` step (x Wᵀ) ⊙ σ'(a), in ``nn.Sequential`` and in
:class:`~rnf_fast.flows.MLP` alike. J v is then a chain of GEMMs with a diagonal scale after
each activation, Jᵀ w the same chain backwards, batched over all K tangents (B·K rows per GEMM),
with no primal recompute and no autograd graph. With grad enabled the one primal keeps its
graph, and the differentiable J v pushes all tangents through the same chain, so autograd
differentiates GEMMs and σ'(a) (σ'' terms included) instead of ``torch.func``'s dual tensors. A
module without a rule (or with hooks) goes through ``torch.func`` for that module only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..flows.coupling import MLP
from ..flows.image import ConvResNet
from .base import Linearization
from .generic import FuncLayer
from .pieces import Chain, Dense, LayerLinearization, Residual, Scale, fold, unfold

__all__ = [
    "MODULE_RULES",
    "SequentialLinearization",
    "activate",
    "supports_activation",
    "linearize_module",
    "supports_sequential",
]

ModuleRule = Callable[[nn.Module, Tensor], tuple[Tensor, LayerLinearization]]

MODULE_RULES: dict[type, ModuleRule] = {}
"""Network module type (exact) -> rule(module, x) returning (y, linearization)."""


def _register(*types: type) -> Callable[[ModuleRule], ModuleRule]:
    def add(rule: ModuleRule) -> ModuleRule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return add


# --- activations ---------------------------------------------------------------------------


def _softplus_grad(m: nn.Softplus) -> Callable[[Tensor], Tensor]:
    def grad(a: Tensor) -> Tensor:
        ba = a * m.beta
        return torch.where(ba > m.threshold, torch.ones_like(a), torch.sigmoid(ba))

    return grad


def _silu_grad(a: Tensor) -> Tensor:
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def _gelu_grad(a: Tensor) -> Tensor:
    cdf = 0.5 * (1 + torch.erf(a * 0.7071067811865476))
    pdf = torch.exp(-0.5 * a * a) * 0.3989422804014327
    return cdf + a * pdf


def _from_output(m: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """σ' as a function of the output y = σ(a), for the activations where that saves work."""
    if type(m) is nn.Tanh:
        return lambda y: 1 - y * y
    if type(m) is nn.Sigmoid:
        return lambda y: y * (1 - y)
    return None


def _from_input(m: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """σ' as a function of the pre-activation a, for the other supported activations."""
    kind = type(m)
    if kind is nn.ReLU:
        return lambda a: (a > 0).to(a.dtype)
    if kind is nn.LeakyReLU:
        return lambda a: torch.where(a > 0, 1.0, torch.full_like(a, m.negative_slope))
    if kind is nn.ELU:
        return lambda a: torch.where(a > 0, torch.ones_like(a), m.alpha * torch.exp(a))
    if kind is nn.Softplus:
        return _softplus_grad(m)
    if kind is nn.SiLU:
        return _silu_grad
    if kind is nn.GELU and m.approximate == "none":
        return _gelu_grad
    return None


def supports_activation(m: nn.Module) -> bool:
    """Whether ``m`` is an elementwise activation with an explicit derivative (exact type):
    Tanh, Sigmoid, ReLU, LeakyReLU, ELU, Softplus, SiLU, exact GELU."""
    return _from_output(m) is not None or _from_input(m) is not None


def activate(m: nn.Module, a: Tensor) -> tuple[Tensor, Tensor]:
    """σ(a) and σ'(a) of a supported activation (see :func:`supports_activation`); with grad
    enabled both keep their graph (σ'' follows).

    σ' is taken from the output where that saves work: 1 - σ(a)² for Tanh and σ(a)(1 - σ(a))
    for Sigmoid, so the nonlinearity is evaluated once.

    Arguments:
        m: the activation module.
        a: (B, ...) the pre-activation.

    Returns:
        (σ(a), σ'(a)), both of a's shape.

    Example:
        >>> y, slope = activate(nn.Tanh(), torch.zeros(1, 2))
        >>> y, slope
        (tensor([[0., 0.]]), tensor([[1., 1.]]))
    """
    from_output = _from_output(m)
    if from_output is not None:
        y = m(a)
        return y, from_output(y)
    from_input = _from_input(m)
    if from_input is None:
        raise TypeError(f"m must be a supported activation, got {type(m).__name__}")
    slope = from_input(a)  # before σ(a): the order of the graph, so of the summed gradients
    return m(a), slope


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


# --- the rules -----------------------------------------------------------------------------


def linearize_module(module: nn.Module, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    """Run a network module once at x and linearize it.

    Explicit rules: ``nn.Linear``, ``nn.Conv2d`` (zero padding), ``nn.GroupNorm``,
    ``nn.Identity``, the activations of :func:`supports_activation`, ``nn.Sequential``,
    :class:`~rnf_fast.flows.MLP` and :class:`~rnf_fast.flows.ConvResNet` (exact types); anything
    else (or a module with hooks) goes through ``torch.func``.

    Arguments:
        module: maps (B, *in) to (B, *out), rows independent.
        x: (B, *in) its input.

    Returns:
        (y (B, *out), linearization).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> y, lin = linearize_module(mlp, torch.randn(5, 3))
        >>> lin.jvp(torch.randn(5, 7, 3)).shape, lin.vjp(torch.randn(5, 7, 2)).shape
        (torch.Size([5, 7, 2]), torch.Size([5, 7, 3]))
    """
    rule = MODULE_RULES.get(type(module))
    if rule is None and supports_activation(module):
        rule = _activation
    if rule is None or _hooked(module):
        return module(x), FuncLayer(module, x, type(module).__name__)
    return rule(module, x)


def _linearize_sequence(modules: Sequence[nn.Module], x: Tensor) -> tuple[Tensor, Chain]:
    """Run modules in order at x; a Linear followed by an activation (Identity between them
    skipped) becomes one fused :class:`~rnf_fast.linearize.pieces.Dense` step."""
    plain = [m for m in modules if not (type(m) is nn.Identity and not _hooked(m))]
    parts: list[LayerLinearization] = []
    i = 0
    while i < len(plain):
        m = plain[i]
        act = plain[i + 1] if i + 1 < len(plain) else None
        fusable = type(m) is nn.Linear and not _hooked(m)
        if fusable and act is not None and supports_activation(act) and not _hooked(act):
            x, slope = activate(act, m(x))
            parts.append(Dense(m.weight, slope))
            i += 2
        else:
            x, lin = linearize_module(m, x)
            parts.append(lin)
            i += 1
    return x, Chain(parts)


def _activation(module: nn.Module, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    y, slope = activate(module, x)
    return y, Scale(slope)


@_register(nn.Identity)
def _identity(module: nn.Identity, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    return x, Chain(())


@_register(nn.Linear)
def _linear(module: nn.Linear, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    return module(x), Dense(module.weight)


@_register(nn.Sequential)
def _sequential(module: nn.Sequential, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    return _linearize_sequence(list(module), x)


@_register(MLP)
def _mlp(mlp: MLP, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    # MLP.forward is act(linear(x)) for every layer but the last.
    modules: list[nn.Module] = []
    for linear in mlp.linears[:-1]:
        modules += [linear, mlp.act]
    return _linearize_sequence([*modules, mlp.linears[-1]], x)


class _Conv:
    """The tangent of a 2-d convolution is the convolution without bias; its transpose is the
    transposed convolution.

    At stride 1 the transpose is itself a convolution, with the kernel flipped, its in and out
    channels swapped (per group) and padding dilation·(k - 1) - padding: on the CPU that ran
    1.9-6x faster than ``nn.grad.conv2d_input`` (the same numbers up to rounding) on the image
    flows' conditioner shapes. Other strides take ``nn.grad.conv2d_input``.
    """

    def __init__(self, conv: nn.Conv2d, in_size: Sequence[int]) -> None:
        self.conv, self.in_size = conv, tuple(in_size)
        k, pad, dil = conv.kernel_size, conv.padding, conv.dilation
        self.flip_padding = tuple(dil[i] * (k[i] - 1) - pad[i] for i in range(2))
        self.as_conv = tuple(conv.stride) == (1, 1) and min(self.flip_padding) >= 0
        self._flipped: Tensor | None = None

    def jvp(self, T: Tensor) -> Tensor:
        c = self.conv
        out = F.conv2d(fold(T), c.weight, None, c.stride, c.padding, c.dilation, c.groups)
        return unfold(out, T)

    def flipped_weight(self) -> Tensor:
        """(in, out / groups, kh, kw): the kernel of the transposed convolution at stride 1."""
        if self._flipped is None:
            w, g = self.conv.weight, self.conv.groups
            out_c, in_per_group, kh, kw = w.shape
            w = w.flip(2, 3).reshape(g, out_c // g, in_per_group, kh, kw).transpose(1, 2)
            self._flipped = w.reshape(g * in_per_group, out_c // g, kh, kw)
        return self._flipped

    def vjp(self, C: Tensor) -> Tensor:
        c = self.conv
        if self.as_conv:
            w = self.flipped_weight()
            out = F.conv2d(fold(C), w, None, 1, self.flip_padding, c.dilation, c.groups)
            return unfold(out, C)
        size = (C.shape[0] * C.shape[1], *self.in_size)
        out = nn.grad.conv2d_input(
            size, c.weight, fold(C), c.stride, c.padding, c.dilation, c.groups
        )
        return unfold(out, C)


@_register(nn.Conv2d)
def _conv2d(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return conv(x), FuncLayer(conv, x, "Conv2d")
    return conv(x), _Conv(conv, x.shape[1:])


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _project(
    T: Tensor,
    scale: Tensor,
    mean_scale: Tensor,
    mean_weight: Tensor | None,
    left: Tensor,
    right: Tensor,
    *,
    graph: bool = False,
) -> Tensor:
    """scale ⊙ T - mean_scale ⊙ mean(mean_weight ⊙ T) - left ⊙ mean(right ⊙ T), the means per
    (sample, tangent, group): two reductions and three elementwise passes over T, in one
    tangent-sized buffer (two with ``graph``, where autograd records it).

    Arguments:
        T: (B, K, G, c, S) tangents, c channels of S entries per group.
        scale: (B, 1, G, c, 1) per channel.
        mean_scale: (B, 1, G, c or 1, 1).
        mean_weight: (1, 1, G, c, 1) per channel, or None (ones).
        left, right: (B, 1, G, c, S).
        graph: differentiable (no ``out=``).

    Returns:
        (B, K, G, c, S) in the promoted dtype of the arguments.
    """
    n = T.shape[-2] * T.shape[-1]
    dtype = torch.promote_types(T.dtype, left.dtype)
    if mean_weight is None:
        mean = T.sum((-2, -1), keepdim=True, dtype=dtype) / n
    else:
        mean = (T.sum(-1, keepdim=True, dtype=dtype) * mean_weight).sum(-2, keepdim=True) / n
    buf = T * right
    mean_right = buf.sum((-2, -1), keepdim=True) / n
    out = T * scale if graph else torch.mul(T, scale, out=buf)
    out.sub_(mean_scale * mean)
    return out.addcmul_(left, mean_right, value=-1)


class _GroupNormTangent(torch.autograd.Function):
    """u = c ⊙ (t - mean(t) - x̂ mean(x̂ ⊙ t)) per (sample, tangent, group), c = γ / σ per
    channel: the GroupNorm tangent, differentiable in t, x̂, 1/σ and γ.

    The backward is written out: autograd through the formula saved three tangent-sized tensors
    and ran 19 passes over such tensors, most into fresh allocations; this saves one,
    p = t - mean(t) - x̂ mean(x̂ t) (u = c ⊙ p), and runs 11 in one buffer (the forward 6, against
    8). Forward and backward took 1.6x (7×7), 2.1x (14×14) and 3.8x (28×28) less time at the
    mnist5k conditioners' shapes (B = 32, K = 20, 8 channels; bench/study_groupnorm.py, one
    thread, a shared machine: indicative). With g = ∂L/∂u ⊙ c and
    P(v) = v - mean(v) - x̂ mean(x̂ v) (symmetric), per (sample, tangent, group) of n entries:

    - ∂L/∂t = P(g);
    - ∂L/∂x̂ = -Σ_k (g mean(x̂ t) + t mean(x̂ g)), with t = p + mean(t) + x̂ mean(x̂ t);
    - ∂L/∂(1/σ) = Σ_k Σ_channels γ q and ∂L/∂γ = Σ_b Σ_k (1/σ) q, with q = Σ ∂L/∂u ⊙ p over
      each (sample, tangent, channel)'s entries (from p, not t: no cancellation).

    Shapes: t (B, K, G, c, S), c channels of S entries per group; x̂ (B, 1, G, c, S); 1/σ
    (B, 1, G, 1, 1); γ (1, 1, G, c, 1) or None. First-order only: nothing differentiates the
    log-det surrogate's gradient.
    """

    @staticmethod
    def forward(ctx, t: Tensor, xhat: Tensor, inv_std: Tensor, weight: Tensor | None) -> Tensor:
        n = t.shape[-2] * t.shape[-1]
        dtype = torch.promote_types(t.dtype, xhat.dtype)
        mean_t = t.sum((-2, -1), keepdim=True, dtype=dtype) / n
        p = torch.mul(t, xhat)
        mean_xt = p.sum((-2, -1), keepdim=True) / n
        torch.sub(t, mean_t, out=p).addcmul_(xhat, mean_xt, value=-1)
        ctx.save_for_backward(p, xhat, inv_std, weight, mean_t, mean_xt)
        return p * _channel_scale(inv_std, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gu: Tensor) -> tuple[Tensor | None, ...]:
        p, xhat, inv_std, weight, mean_t, mean_xt = ctx.saved_tensors
        need_t, need_x, need_s, need_w = ctx.needs_input_grad
        n = p.shape[-2] * p.shape[-1]
        c = _channel_scale(inv_std, weight)
        buf = gu * xhat
        mean_g = (gu.sum(-1, keepdim=True) * c).sum(-2, keepdim=True) / n  # mean(g)
        mean_xg = (buf.sum(-1, keepdim=True) * c).sum(-2, keepdim=True) / n  # mean(x̂ g)
        grad_t = grad_x = grad_s = grad_w = None
        if need_s or need_w:
            q = torch.mul(gu, p, out=buf).sum(-1, keepdim=True)
            if need_s:
                grad_s = (q if weight is None else q * weight).sum((1, 3), keepdim=True)
            if need_w:
                grad_w = (q * inv_std).sum((0, 1), keepdim=True)
        if need_x:
            # -Σ_k (g mean(x̂ t) + (p + mean(t) + x̂ mean(x̂ t)) mean(x̂ g))
            torch.mul(gu, c * mean_xt, out=buf).addcmul_(p, mean_xg)
            grad_x = buf.sum(1, keepdim=True)
            grad_x.add_((mean_t * mean_xg).sum(1, keepdim=True))
            grad_x.addcmul_(xhat, (mean_xt * mean_xg).sum(1, keepdim=True)).neg_()
        if need_t:
            grad_t = torch.mul(gu, c, out=buf).sub_(mean_g).addcmul_(xhat, mean_xg, value=-1)
        return grad_t, grad_x, grad_s, grad_w


def _channel_scale(inv_std: Tensor, weight: Tensor | None) -> Tensor:
    """c = γ / σ per (sample, channel): (B, 1, G, c or 1, 1)."""
    return inv_std if weight is None else inv_std * weight


class _GroupNorm:
    """GroupNorm's Jacobian per group, J t = γ ⊙ P(t) / σ, and its transpose Jᵀ w = P(γ ⊙ w) / σ,
    with P(v) = v - mean(v) - x̂ mean(x̂ ⊙ v).

    Without a graph (CG's products) both run through :func:`_project`, their factors (c = γ/σ,
    c ⊙ x̂, ...) formed on the first call. With one, ``jvp`` is :class:`_GroupNormTangent`:
    autograd through the plain formula was about half of an exact step's backward on the
    ``mnist5k`` image flow (by a profile of that step), d = 20 tangents through 12 GroupNorms.

    Arguments:
        xhat: (B, G, n) the normalised input per group (may carry a graph).
        inv_std: (B, G, 1) 1/σ per group.
        weight: (C,) γ, or None (no affine).
        shape: (C, *spatial) the layer's input shape per sample.
    """

    def __init__(
        self, xhat: Tensor, inv_std: Tensor, weight: Tensor | None, shape: Sequence[int]
    ) -> None:
        B, G = xhat.shape[:2]
        channels = shape[0]
        self._view = (G, channels // G, -1)
        self.xhat = xhat.view(B, 1, *self._view)
        self.inv_std = inv_std.view(B, 1, G, 1, 1)
        self.weight = None if weight is None else weight.view(1, 1, G, channels // G, 1)
        self._factors: dict[str, tuple[Tensor, ...]] = {}

    def _grouped(self, T: Tensor) -> Tensor:
        return T.reshape(*T.shape[:2], *self._view)

    def _detached(self, kind: str) -> tuple[Tensor, ...]:
        """The factors of :func:`_project` for ``kind`` ("jvp" or "vjp"), formed once with no
        graph."""
        if kind not in self._factors:
            with torch.no_grad():
                self._factors[kind] = self._form(kind)
        return self._factors[kind]

    def _form(self, kind: str) -> tuple[Tensor, ...]:
        # In one dtype (x̂ and 1/σ bf16 under autocast, γ float32): _project's buffer, of T's
        # product with one factor, then has the dtype of its result.
        dtype = torch.promote_types(self.xhat.dtype, self.inv_std.dtype)
        if self.weight is not None:
            dtype = torch.promote_types(dtype, self.weight.dtype)
        xhat, inv_std = self.xhat.to(dtype), self.inv_std.to(dtype)
        weight = None if self.weight is None else self.weight.to(dtype)
        c = _channel_scale(inv_std, weight)
        if kind == "jvp":
            return c, c, None, c * xhat, xhat
        # Jᵀ w = (1/σ) P(γ w): the means are of γ ⊙ w and γ ⊙ x̂ ⊙ w.
        right = xhat if weight is None else weight * xhat
        return c, inv_std, weight, inv_std * xhat, right

    def jvp(self, T: Tensor) -> Tensor:
        if _needs_graph(T, self.xhat, self.inv_std, self.weight):
            u = _GroupNormTangent.apply(self._grouped(T), self.xhat, self.inv_std, self.weight)
            return u.reshape(T.shape)
        return _project(self._grouped(T), *self._detached("jvp")).reshape(T.shape)

    def vjp(self, C: Tensor) -> Tensor:
        if _needs_graph(C, self.xhat, self.inv_std, self.weight):
            out = _project(self._grouped(C), *self._form("vjp"), graph=True)
        else:
            out = _project(self._grouped(C), *self._detached("vjp"))
        return out.reshape(C.shape)


def group_norm_primal(gn: nn.GroupNorm, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """GroupNorm at x (B, C, ...) with the factors of its Jacobian: (y, x̂ (B, G, n), 1/σ
    (B, G, 1)), the normalised input and the inverse standard deviation per group."""
    B, G = x.shape[0], gn.num_groups
    xg = x.reshape(B, G, -1)
    centred = xg - xg.mean(-1, keepdim=True)
    inv_std = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + gn.eps)
    xhat = centred * inv_std
    y = xhat.reshape(x.shape)
    if gn.affine:
        shape = (-1, *([1] * (x.dim() - 2)))
        y = y * gn.weight.view(shape) + gn.bias.view(shape)
    return y, xhat, inv_std


@_register(nn.GroupNorm)
def _group_norm(gn: nn.GroupNorm, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    y, xhat, inv_std = group_norm_primal(gn, x)
    return y, _GroupNorm(xhat, inv_std, gn.weight if gn.affine else None, x.shape[1:])


@_register(ConvResNet)
def _conv_resnet(net: ConvResNet, x: Tensor) -> tuple[Tensor, LayerLinearization]:
    h, first = linearize_module(net.in_conv, x)
    parts = [first]
    for block in net.blocks:
        r, lin = linearize_module(block, h)
        h = h + r
        parts.append(Residual(lin))
    y, last = linearize_module(net.out, h)
    return y, Chain([*parts, last])


# --- plain MLP decoders --------------------------------------------------------------------


def supports_sequential(decoder: object) -> bool:
    """Whether ``decoder`` is an ``nn.Sequential`` MLP that :func:`rnf_fast.linearize`
    linearizes explicitly: only ``nn.Linear``, ``nn.Identity`` and the activations of
    :func:`supports_activation` (exact types), at least one Linear, no hooks."""
    if type(decoder) is not nn.Sequential or len(decoder) == 0 or _hooked(decoder):
        return False
    has_linear = False
    for m in decoder:
        if _hooked(m):
            return False
        if type(m) is nn.Linear:
            has_linear = True
        elif type(m) is not nn.Identity and not supports_activation(m):
            return False
    return has_linear


def _split_final_linear(decoder: nn.Sequential) -> tuple[list[nn.Module], nn.Linear | None]:
    """(the layers before a final Linear, that Linear) where the decoder ends in one after at
    least one other Linear and all its parameters share one dtype; else (all layers, None)."""
    plain = [m for m in decoder if not (type(m) is nn.Identity and not _hooked(m))]
    dtypes = {p.dtype for p in decoder.parameters()}
    body, last = plain[:-1], plain[-1]
    if type(last) is nn.Linear and any(type(m) is nn.Linear for m in body) and len(dtypes) == 1:
        return body, last
    return plain, None


def _autocast_state(device_type: str) -> tuple[torch.dtype, bool] | None:
    """(dtype, cache_enabled) of the autocast active on ``device_type``, or None."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type), torch.is_autocast_cache_enabled()


def _autocast_entered(
    device_type: str, state: tuple[torch.dtype, bool] | None
) -> contextlib.AbstractContextManager:
    """The autocast of :func:`_autocast_state` entered again (none: autocast off)."""
    if state is None:
        if torch.amp.is_autocast_available(device_type):
            return torch.autocast(device_type, enabled=False)
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=state[0], cache_enabled=state[1])


class SequentialLinearization(Linearization):
    """:class:`rnf_fast.Linearization` of a supported ``nn.Sequential`` MLP at z, through the
    rules of :func:`linearize_module`.

    Arguments:
        decoder: an ``nn.Sequential`` for which :func:`supports_sequential` holds.
        z: (B, d) the point (may require grad).

    Example:
        >>> mlp = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 40))
        >>> lin = SequentialLinearization(mlp, torch.randn(5, 2))
        >>> lin.gram().shape  # A = Mᵀ(WᵀW)M: the last Linear is narrow (3 < 40)
        torch.Size([5, 2, 2])
    """

    path = "explicit"
    batching = "explicit"

    def __init__(self, decoder: nn.Sequential, z: Tensor) -> None:
        if not supports_sequential(decoder):
            raise TypeError(
                "decoder must be an nn.Sequential of Linear layers and supported "
                "elementwise activations"
            )
        self.decoder = decoder
        self.z = z
        # One primal, with the graph when grad is enabled: the CG and Gram products use its
        # factors (no graph is recorded under their no_grad), the differentiable products
        # (``jvp(create_graph=True)``, ``gram``, ``jvp_hidden``) reuse them instead of running
        # the decoder again (about 6% of a cg step and 3% of an exact one on the tanh MLP
        # 16-256-256-784 at B = 64, 1 thread, interleaved), and ``output`` hands the output
        # with its graph to a caller that needs it.
        self._graph = torch.is_grad_enabled()
        self._body, self._final = _split_final_linear(decoder)
        # The primal stops before a final Linear: the log det needs only its weight (J = W M),
        # and the final GEMM was about 5% of a cg step on the MLP above (the widest layer);
        # ``out`` and ``output`` run it on first access, under the autocast of the primal.
        hidden, self._chain = self._primal(z if self._graph else z.detach())
        self._hidden = hidden if self._final is not None else None
        self._autocast = _autocast_state(z.device.type)
        self._out: Tensor | None = None if self._final is not None else hidden.detach()
        self._output: Tensor | None = None
        if self._final is None and self._graph:
            self._output = hidden
        self._WtW: Tensor | None = None

    def _primal(self, z: Tensor) -> tuple[Tensor, Chain]:
        """The decoder's primal up to its final Linear (all of it without one) and the chain of
        every layer's factors (the final Linear's is its weight)."""
        hidden, chain = _linearize_sequence(self._body, z)
        if self._final is None:
            return hidden, chain
        return hidden, Chain([*chain.parts, Dense(self._final.weight)])

    def _run_final(self, grad: bool) -> Tensor:
        with _autocast_entered(self.z.device.type, self._autocast), torch.set_grad_enabled(grad):
            return self._final(self._hidden)

    @property
    def output(self) -> Tensor | None:
        """decoder(z) with its graph where the primal kept one (grad enabled), else None."""
        if self._output is None and self._graph and self._final is not None:
            self._output = self._run_final(True)
        return self._output

    @property
    def out(self) -> Tensor:
        """decoder(z), detached."""
        if self._out is None:
            self._out = self.output.detach() if self._graph else self._run_final(False)
        return self._out

    def output_spec(self) -> Tensor | None:
        """What the engine's output check needs of a final Linear's output not computed yet: a
        (B, D) stand-in (no memory) with its dtype and device; None once ``out`` exists, or
        where the output can overflow from finite inputs (float16), so the check takes it."""
        if self._out is not None or self._final is None:
            return None
        dtype = self._hidden.dtype
        if self._autocast is not None and dtype != torch.float64:
            dtype = self._autocast[0]
        if dtype == torch.float16:
            return None
        template = torch.empty((), dtype=dtype, device=self.z.device)
        return template.expand(self.z.shape[0], self._final.out_features)

    def output_surely_finite(self) -> bool:
        """Whether the final Linear's inputs are finite (the hidden output, the weight and the
        bias), so its output is (see :meth:`output_spec`): a host synchronisation. Tested on
        the sum of their sums, which is finite only if every entry is (a finite sum that
        overflows says no: the caller then checks the output itself); an elementwise isfinite
        over the weight cost more than the GEMM it replaces."""
        with torch.no_grad():
            total = self._hidden.sum() + self._final.weight.sum()
            if self._final.bias is not None:
                total = total + self._final.bias.sum()
        return bool(torch.isfinite(total))

    def _chain_with_graph(self) -> Chain:
        """The chain with its factors differentiable in z and the decoder's parameters: the
        construction's when it kept the graph, else from a primal run again with it."""
        if self._graph:
            return self._chain
        with torch.enable_grad():
            return self._primal(self.z)[1]

    def _final_weight(self) -> Tensor | None:
        """The weight (D, n) of a final Linear with no activation after it, else None."""
        last = self._chain.parts[-1]
        if isinstance(last, Dense) and last.scale is None:
            return last.weight
        return None

    def jvp(self, V: Tensor, *, create_graph: bool = False) -> Tensor:
        """J v_k per sample: V (B, K, d) -> (B, K, D); differentiable in z and the decoder's
        parameters with ``create_graph`` (through the primal's graph, see
        :meth:`_chain_with_graph`)."""
        if not create_graph:
            with torch.no_grad():
                return self._chain.jvp(V)
        with torch.enable_grad():
            return self._chain_with_graph().jvp(V)

    def vjp(self, C: Tensor) -> Tensor:
        """Jᵀ c_k per sample, no graph: C (B, K, D) -> (B, K, d)."""
        with torch.no_grad():
            return self._chain.vjp(C)

    def gram(self, *, create_graph: bool = False) -> Tensor | None:
        """A = JᵀJ (B, d, d) without forming J, when the decoder ends in a Linear W (D, n)
        with no activation after it and that is cheaper: J = W M with M (B, n, d) the Jacobian
        up to W's input, so A = Mᵀ (WᵀW) M; WᵀW is computed once per call, and the d tangents
        never pass through the widest layer. Returns None where it does not pay (n too wide).
        M comes in the decoder's compute dtype (autocast's where one is active); A is formed
        from it in float32 at least, outside autocast.

        Arguments:
            create_graph: differentiable with respect to z and the decoder's parameters.
        """
        weight = self._final_weight()
        if weight is None:
            return None
        B, d = self.z.shape
        D, n = weight.shape
        # Multiply-adds: (M G) Mᵀ and G = WᵀW against J = W M and JᵀJ.
        if B * d * n * (n + d) + n * n * D >= B * d * D * (n + d):
            return None
        with torch.set_grad_enabled(create_graph):
            hidden = Chain((self._chain_with_graph() if create_graph else self._chain).parts[:-1])
            E = torch.eye(d, dtype=self.z.dtype, device=self.z.device).expand(B, d, d)
            MT = hidden.jvp(E)  # (B, d, n): row k is M e_k, in the decoder's compute dtype
            # A Gram matrix is never formed in 16 bits, nor under the caller's autocast.
            acc = torch.promote_types(MT.dtype, torch.float32)
            device = MT.device.type
            off = torch.amp.is_autocast_available(device)
            with torch.autocast(device, enabled=False) if off else contextlib.nullcontext():
                MT, W = MT.to(acc), weight.to(acc)
                A = (MT @ (W.T @ W)) @ MT.transpose(1, 2)
            return 0.5 * (A + A.transpose(1, 2))

    def gram_mv_hidden(self, V: Tensor) -> tuple[Tensor, Tensor] | None:
        """(M v_k, Jᵀ J v_k) per sample, no graph, where J = W M and W (D, n) is a final Linear
        with no activation after it: Jᵀ J v = Mᵀ ((WᵀW)(M v)) never passes the tangents through
        the widest layer (2 n D multiply-adds per row become n²; WᵀW is formed once, on the first
        call). ``lift`` maps M v to J v. None where this does not pay (n ≥ 2D, or too few rows to
        repay WᵀW even at d iterations).

        Arguments:
            V: (B, K, d) tangents.

        Returns:
            ((B, K, n), (B, K, d)), or None.
        """
        weight = self._final_weight()
        if weight is None:
            return None
        B, K, d = V.shape
        D, n = weight.shape
        if 2 * n * D <= n * n or B * K * d * (2 * n * D - n * n) <= n * n * D:
            return None
        with torch.no_grad():
            if self._WtW is None:
                self._WtW = weight.T @ weight
            hidden = Chain(self._chain.parts[:-1])
            H = hidden.jvp(V)
            return H, hidden.vjp(H @ self._WtW)

    def jvp_hidden(self, V: Tensor) -> tuple[Tensor, Tensor] | None:
        """(M v_k, W) differentiable in z and the decoder's parameters, where J = W M and W
        (D, n) is a final Linear with no activation after it; None without one.

        For the surrogate's ⟨c, J v⟩ = ⟨c W, M v⟩ (:func:`rnf_fast.engine.estimator.tangent_inner`):
        the tangents stop before the widest layer, and the backward has one GEMM through W
        (c W's weight gradient) instead of two (J v's input and weight gradients): 4% of a cg
        step on the tanh MLP 16-256-256-784 at B = 64 (1 thread, interleaved).

        Arguments:
            V: (B, K, d) tangents.

        Returns:
            ((B, K, n) with its graph, the (D, n) weight), or None.
        """
        weight = self._final_weight()
        if weight is None:
            return None
        with torch.enable_grad():
            return Chain(self._chain_with_graph().parts[:-1]).jvp(V), weight

    def lift(self, H: Tensor) -> Tensor:
        """J v from the M v of :meth:`gram_mv_hidden`: H (B, K, n) -> (B, K, D), no graph."""
        with torch.no_grad():
            return H @ self._chain.parts[-1].weight.T
