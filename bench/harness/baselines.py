"""The alternatives rnf_fast is measured against (the dense float64 truth is
:func:`rnf_fast.testing.dense_logdet`).

- :func:`logdet_jacrev`: what a user of plain reverse-mode autodiff writes:
  ``vmap(jacrev)`` for J (D backward passes), ``slogdet(JᵀJ)``, backward through all of it.
- :func:`logdet_jacfwd`: the strongest plain-PyTorch exact path: ``vmap(jacfwd)`` (d tangents),
  ``slogdet(JᵀJ)``, backward.
- :func:`logdet_official_cg`: the algorithm of the rectangular-flows paper's official code:
  Hutchinson probes, CG whose every matvec is one primal+tangent pass of the decoder
  (hand-written forward-mode layers for MLPs, as that code has; forward-mode dual tensors for
  other decoders) followed by ``torch.autograd.functional.vjp`` (a fresh forward and a
  backward), a loose batch-level stopping rule, then a differentiable JᵀJε and a double
  backward.
- :func:`logdet_fif`: the free-form injective flow surrogate (Sorrenson et al., ICLR 2024): an
  encoder stands in for the decoder's pseudo-inverse; one decoder JVP and one encoder VJP per
  probe, no CG. Biased unless the encoder's Jacobian is the pseudo-inverse of the decoder's.
:func:`logdet_jacrev` and :func:`logdet_jacfwd` return log det(JᵀJ) per sample,
differentiable end to end. The two stochastic baselines compute no value: they return zeros
that carry the gradient estimate (``S - S.detach()``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import jacfwd, jacrev, vmap
from torch.nn import functional as F

from rnf_fast.testing import slogdet_gram

__all__ = [
    "logdet_fif",
    "logdet_jacfwd",
    "logdet_jacrev",
    "logdet_official_cg",
    "tangent_pass",
]


def _per_row(decoder: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda zi: decoder(zi.unsqueeze(0)).squeeze(0)


def logdet_jacrev(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """log det(JᵀJ) per sample with J from reverse mode (``vmap(jacrev)``).

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d).

    Returns:
        (B,) differentiable log dets.
    """
    return slogdet_gram(vmap(jacrev(_per_row(decoder)))(z))


def logdet_jacfwd(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """log det(JᵀJ) per sample with J from forward mode (``vmap(jacfwd)``).

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d).

    Returns:
        (B,) differentiable log dets.
    """
    return slogdet_gram(vmap(jacfwd(_per_row(decoder)))(z))


def _probe_matrix(probes: int | Tensor, z: Tensor, generator: torch.Generator | None) -> Tensor:
    """Probes (B, K, d) with E[v vᵀ] = I: the given tensor, or K standard Gaussian draws per
    sample (the official code's choice)."""
    B, d = z.shape
    if isinstance(probes, Tensor):
        if probes.dim() != 3 or probes.shape[0] != B or probes.shape[2] != d:
            raise ValueError(
                f"probes tensor must be (B, K, d) = ({B}, K, {d}), got {tuple(probes.shape)}"
            )
        return probes.to(z)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer or a (B, K, d) tensor, got {probes!r}")
    return torch.randn(B, probes, d, generator=generator, dtype=z.dtype, device=z.device)


TangentPass = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(z (N, d), t (N, d)) -> (decoder(z) (N, D), J t (N, D)): the primal and one tangent per row,
in one pass."""


def _gelu_slope(layer: nn.GELU, a: Tensor, y: Tensor) -> Tensor:
    # GELU(a) = a Φ(a), slope Φ(a) + a φ(a).
    cdf = 0.5 * (1 + torch.erf(a * 0.5**0.5))
    pdf = torch.exp(-0.5 * a * a) * (2 * torch.pi) ** -0.5
    return cdf + a * pdf


def _softplus_slope(layer: nn.Softplus, a: Tensor, y: Tensor) -> Tensor:
    # Above its threshold softplus is the identity: slope 1 there, sigmoid(β a) below.
    ba = layer.beta * a
    return torch.where(ba > layer.threshold, torch.ones_like(a), torch.sigmoid(ba))


_SLOPES: dict[type, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    nn.Tanh: lambda layer, a, y: 1 - y * y,
    nn.ReLU: lambda layer, a, y: (a > 0).to(y.dtype),
    nn.Softplus: _softplus_slope,
    nn.GELU: _gelu_slope,
}
"""σ'(a) of the elementwise activations from the input a and the output y = σ(a)."""


def _layer_pass(layer: nn.Module) -> TangentPass | None:
    """The hand-written primal+tangent rule of one layer, None where there is none."""
    if type(layer) is nn.Linear:
        return lambda a, t: (layer(a), F.linear(t, layer.weight))
    slope = _SLOPES.get(type(layer))
    if slope is None or (type(layer) is nn.GELU and layer.approximate != "none"):
        return None

    def rule(a: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        y = layer(a)
        return y, slope(layer, a, y) * t

    return rule


def _forward_ad_pass(decoder: Callable[[Tensor], Tensor]) -> TangentPass:
    def push(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        with fwAD.dual_level():
            x, Jt = fwAD.unpack_dual(decoder(fwAD.make_dual(z, t)))
        return x, Jt

    return push


def tangent_pass(decoder: Callable[[Tensor], Tensor]) -> TangentPass:
    """The decoder's primal and its J t in one pass, the way the official code pushes tangents.

    An ``nn.Sequential`` of ``Linear`` and elementwise activations (Tanh, ReLU, Softplus, exact
    GELU) gets hand-written forward-mode layers like the official code's: a Linear maps
    (a, t) to (W a + b, W t), an activation to (σ(a), σ'(a) t) with σ' from what the layer
    has at hand (tanh: 1 - σ(a)², relu: [a > 0], softplus: sigmoid(β a), GELU: Φ(a) + a φ(a)).
    Any other decoder (the rectangular flows' couplings, convolutions and norms, custom
    modules) runs once on ``torch.autograd.forward_ad`` dual tensors: one primal+tangent pass
    with PyTorch's own tangent rules, no functorch transform, the closest generic equivalent of
    hand-written layers. Both record a graph when grad is enabled (the tangent then depends
    differentiably on the parameters and on z).

    Arguments:
        decoder: callable mapping (N, d) to (N, D), rows independent.

    Returns:
        A callable (z (N, d), t (N, d)) -> (decoder(z) (N, D), J t (N, D)), one tangent per row.
    """
    if isinstance(decoder, nn.Sequential):
        rules = [_layer_pass(layer) for layer in decoder]
        if all(rule is not None for rule in rules):

            def push(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
                for rule in rules:
                    z, t = rule(z, t)
                return z, t

            return push
    return _forward_ad_pass(decoder)


def _official_gram_mv(
    decoder: Callable[[Tensor], Tensor], push: TangentPass, z: Tensor, P: Tensor
) -> Tensor:
    """JᵀJ P the official way, no graph kept: one primal+tangent pass for J P, then
    ``torch.autograd.functional.vjp`` (a fresh forward and a backward) for Jᵀ(J P)."""
    with torch.no_grad():
        JP = push(z, P)[1]
    return torch.autograd.functional.vjp(decoder, z, JP)[1]


def logdet_official_cg(
    decoder: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    probes: int | Tensor = 1,
    tol: float = 1.0,
    min_iter: int = 11,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, int]]:
    """The gradient of log det(JᵀJ) as the official rectangular-flows code estimates it.

    K probes ε per sample (standard Gaussian unless given); u = (JᵀJ)⁻¹ε by CG from a zero
    initial guess on all B·K systems at once. Each matvec JᵀJ p is what the official code
    runs: one no-grad primal+tangent pass for J p (:func:`tangent_pass`: hand-written
    forward-mode layers for an MLP, ``torch.autograd.forward_ad`` dual tensors for any other
    decoder), then ``torch.autograd.functional.vjp`` for Jᵀ(J p), a fresh forward and a
    backward; no state is reused between matvecs. CG stops when the batch-mean relative
    residual ‖r‖/‖ε‖ is below ``tol`` after at least min(``min_iter``, d) iterations, and after
    d at most (``max_iter``). Then a differentiable JᵀJε is built (a primal+tangent pass with
    graph, and a VJP of its primal output with ``create_graph``: one forward fewer than the
    official code, whose ``vjp`` runs its own) and dotted with the detached u, averaged over
    the K probes; its backward is a double backward. With
    A = JᵀJ and E[ε εᵀ] = I, E[uᵀ (∂A) ε] = E[εᵀ A⁻¹ (∂A) ε] = tr(A⁻¹ ∂A) = ∂ log det A: the
    gradient is unbiased up to the CG error (which tol = 1 leaves large).

    Arguments:
        decoder: callable mapping (B, d) to (B, D), rows independent.
        z: (B, d) latents; may require grad.
        probes: K, or a (B, K, d) tensor of probes with E[v vᵀ] = I.
        tol: the batch-mean relative residual to stop at (1, the official setting, stops as
            soon as min(``min_iter``, d) iterations are done).
        min_iter: iterations always run (capped at d).
        max_iter: iteration cap, default d.
        generator: source of the Gaussian probes.
        return_info: also return ``{"matvecs": ..., "cg_iterations": ...}`` (equal here: one
            JᵀJ product per iteration, each costing a primal+tangent pass, a forward and a
            backward of the decoder).

    Returns:
        (B,) zeros carrying the gradient estimate (no log det value is computed), with the
        info dict when ``return_info`` is set.
    """
    B, d = z.shape
    V = _probe_matrix(probes, z, generator)
    K = V.shape[1]
    cap = d if max_iter is None else max_iter
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    zr = z.detach().repeat_interleave(K, dim=0)
    b = V.reshape(B * K, d)
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    tiny = torch.finfo(b.dtype).tiny
    bnorm = b.norm(dim=1).clamp_min(tiny)
    push = tangent_pass(decoder)
    iterations = 0
    for it in range(cap):
        iterations = it + 1
        Ap = _official_gram_mv(decoder, push, zr, p)
        pAp = (p * Ap).sum(1)
        # A system solved exactly (r = p = 0) stays put instead of dividing 0 by 0.
        alpha = torch.where(pAp > 0, rr / pAp.clamp_min(tiny), torch.zeros_like(pAp))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * Ap
        rr_new = (r * r).sum(1)
        if it + 1 >= min(min_iter, d) and float((r.norm(dim=1) / bnorm).mean()) < tol:
            break
        p = r + (rr_new / rr.clamp_min(tiny))[:, None] * p
        rr = rr_new
    zg = z if z.requires_grad else z.detach().requires_grad_(True)
    zk = zg.repeat_interleave(K, dim=0)
    out, JV = push(zk, b)
    JTJV = torch.autograd.grad(out, zk, JV, create_graph=True)[0]
    S = (x.detach() * JTJV).sum(1).view(B, K).mean(1)
    out = S - S.detach()
    return (out, {"matvecs": iterations, "cg_iterations": iterations}) if return_info else out


def logdet_fif(
    decoder: Callable[[Tensor], Tensor],
    encoder: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    probes: int | Tensor = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The free-form injective flow estimate of the gradient of log det(JᵀJ).

    With the decoder's Jacobian J (D × d) at z and the encoder's Jacobian E (d × D) at the
    decoded point x = decoder(z), and K probes v (E[v vᵀ] = I_d, standard Gaussian unless
    given), the surrogate is

        S = (2 / K) · Σ_k ⟨ stopgrad(Eᵀ v_k), J v_k ⟩,

    one decoder JVP and one encoder VJP per probe, no CG. Its expected gradient is
    2 tr(E ∂J); with E = J⁺ = (JᵀJ)⁻¹Jᵀ, the pseudo-inverse, that is ∂ log det(JᵀJ) (the
    factor 2: ∂ log det(JᵀJ) = 2 tr(J⁺ ∂J)). Any other left inverse (a flow's g†, a trained
    encoder) biases it.

    Arguments:
        decoder: callable mapping (B, d) to (B, D), rows independent.
        encoder: callable mapping (B, D) to (B, d), rows independent.
        z: (B, d) latents; may require grad.
        probes: K, or a (B, K, d) tensor of probes with E[v vᵀ] = I.
        generator: source of the Gaussian probes.

    Returns:
        (B,) zeros carrying the gradient estimate: no log det value is computed.
    """
    B, d = z.shape
    V = _probe_matrix(probes, z, generator)
    K = V.shape[1]
    zk = z.repeat_interleave(K, dim=0)
    out, JV = torch.func.jvp(decoder, (zk,), (V.reshape(B * K, d),))
    with torch.enable_grad():
        xk = out.detach().requires_grad_(True)
        enc = encoder(xk)
        if not isinstance(enc, Tensor) or enc.shape != (B * K, d):
            raise ValueError(f"encoder must map (B, D) to (B, d) = (B, {d}), got {enc.shape}")
        ETV = torch.autograd.grad(enc, xk, V.reshape(B * K, d))[0]
    S = (2.0 / K) * (ETV.detach() * JV).sum(1).view(B, K).sum(1)
    return S - S.detach()
