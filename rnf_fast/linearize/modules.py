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


@_register(nn.GroupNorm)
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
        output, self._chain = _linearize_sequence(list(decoder), z if self._graph else z.detach())
        self.out = output.detach()
        self.output = output if self._graph else None
        self._WtW: Tensor | None = None

    def _chain_with_graph(self) -> Chain:
        """The chain with its factors differentiable in z and the decoder's parameters: the
        construction's when it kept the graph, else from a primal run again with it."""
        if self._graph:
            return self._chain
        with torch.enable_grad():
            return _linearize_sequence(list(self.decoder), self.z)[1]

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
