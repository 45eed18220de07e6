"""Benchmark problems: a decoder, a batch of latents and the float64 dense truth at them.

:data:`PROBLEMS` names the sizes (MLP decoders and the decoders of rectangular flows),
:func:`make_problem` builds one in float32 with its truth, :data:`SUITES` and :data:`STUDY_D`
say which ones the suite and its study over d run. The free-form surrogate's encoders are here
too (:func:`problem_encoder`, :func:`pseudo_inverse_encoder`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from rnf_fast.models import FlowConfig, RectangularFlow
from rnf_fast.testing import dense_jacobian, grads, mlp_decoder

__all__ = [
    "PROBLEMS",
    "STUDY_D",
    "SUITES",
    "Problem",
    "ProblemSpec",
    "flow_decoder",
    "make_problem",
    "mlp_encoder",
    "problem_encoder",
    "pseudo_inverse_encoder",
]


@dataclass(frozen=True)
class ProblemSpec:
    """A named problem size.

    ``kind="mlp"``: an MLP decoder d -> hidden -> D with tanh, batch B. ``kind="flow"``: the
    decoder of a :class:`rnf_fast.models.RectangularFlow` built from ``FlowConfig(D, d,
    **flow)``, its zero-initialised last conditioner layers perturbed so that it is not an
    isometry. ``verify_batch`` (flows): the batch on which the answer is checked against the
    float64 dense truth, whose cost grows with B · d forward-mode passes of the whole flow.
    """

    d: int
    D: int
    B: int
    hidden: tuple[int, ...] = ()
    kind: str = "mlp"
    flow: dict = field(default_factory=dict)
    verify_batch: int | None = None
    about: str = ""


_TABULAR_F = {"f_layers": 10, "f_hidden": (128,) * 4, "f_coupling": "affine"}
_MNIST_F = {"image_shape": (1, 28, 28), "image_scales": 2, "image_blocks": 2, "image_channels": 16}

PROBLEMS: dict[str, ProblemSpec] = {
    # The standard problem: the paper's MNIST-sized MLP decoder.
    "mlp-16-784": ProblemSpec(
        d=16, D=784, B=64, hidden=(256, 256), about="MNIST-sized MLP decoder, tanh"
    ),
    "mlp-64-784": ProblemSpec(
        d=64, D=784, B=64, hidden=(256, 256), about="MNIST-sized MLP decoder, larger latent"
    ),
    # Wide decoder where the tangents' graph, not J, dominates memory: the chunking study.
    "mlp-64-784-wide": ProblemSpec(
        d=64, D=784, B=64, hidden=(1024, 1024), about="wide MLP decoder (chunking study)"
    ),
    "flow-miniboone": ProblemSpec(
        d=21,
        D=43,
        B=400,
        kind="flow",
        flow=_TABULAR_F,
        verify_batch=16,
        about="MINIBOONE-sized RealNVP rectangular flow: 10 affine couplings, conditioners [128]*4",
    ),
    "flow-power": ProblemSpec(
        d=2,
        D=6,
        B=5000,
        kind="flow",
        flow=_TABULAR_F,
        verify_batch=64,
        about="POWER-sized RealNVP rectangular flow: 10 affine couplings, conditioners [128]*4",
    ),
    "flow-mnist": ProblemSpec(
        d=20,
        D=784,
        B=50,
        kind="flow",
        flow=_MNIST_F,
        verify_batch=4,
        about="MNIST-sized multi-scale conv RealNVP (1×28×28, 2 scales, 2 blocks, 16 channels)",
    ),
    # Tiny versions for CI: same code paths, run in milliseconds.
    "quick": ProblemSpec(d=3, D=10, B=4, hidden=(8, 8), about="tiny MLP decoder (CI)"),
    "quick-flow": ProblemSpec(
        d=2,
        D=6,
        B=4,
        kind="flow",
        flow={"f_layers": 2, "f_hidden": (8, 8)},
        about="tiny RealNVP rectangular flow (CI)",
    ),
    "quick-image": ProblemSpec(
        d=3,
        D=16,
        B=2,
        kind="flow",
        flow={"image_shape": (1, 4, 4), "image_blocks": 1, "image_channels": 4},
        about="tiny conv RealNVP, 1×4×4 (CI)",
    ),
}


@dataclass
class Problem:
    """A decoder, latents and the float64 dense truth at them.

    Attributes:
        decoder: the float32 decoder (an ``nn.Module`` for MLPs; :func:`flow_decoder` of the
            model for flows).
        z: (B, d) float32 latents, requiring grad.
        params: the parameters the gradient is checked on (those of the decoder).
        truth_value, truth_grads: float64 log det(JᵀJ) (B,) and its gradients with respect to
            ``[*params, z]`` (empty without truth).
        model: the rectangular flow (flows only).
        decoder64, params64, z64, J64: the float64 decoder, its parameters, latents and dense
            Jacobian (B, D, d) the truth came from (empty without truth).
    """

    name: str
    spec: ProblemSpec
    decoder: Callable[[Tensor], Tensor]
    z: Tensor
    truth_value: Tensor
    truth_grads: list[Tensor]
    params: list[Tensor] = field(default_factory=list)
    model: nn.Module | None = None
    decoder64: Callable[[Tensor], Tensor] | None = None
    params64: list[Tensor] = field(default_factory=list)
    z64: Tensor | None = None
    J64: Tensor | None = None


def flow_decoder(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The decoder to hand to :func:`rnf_fast.logdet_grad` for a rectangular flow: its
    ``decoder`` (with an explicit ``linearize``) where the model has one, else ``decode``."""
    decoder = getattr(model, "decoder", None)
    return decoder if decoder is not None else model.decode


def _perturb_zero_parameters(module: nn.Module, *, scale: float, seed: int) -> None:
    """Add scale · N(0, 1) to every all-zero parameter (the zero-initialised last conditioner
    layers, identity LU factors, unset ActNorms): the flow is then neither the identity nor an
    isometry. scale = 0.05 gives cond(J) of about 2-5 on the tabular problems."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() and bool((p == 0).all()):
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _build_model(spec: ProblemSpec, seed: int) -> nn.Module:
    config = FlowConfig(D=spec.D, d=spec.d, h_layers=1, h_hidden=(8,), seed=seed, **spec.flow)
    model = RectangularFlow(config).double().eval()
    _perturb_zero_parameters(model.f, scale=0.05, seed=seed)
    return model


def _truth(decoder: Callable[[Tensor], Tensor], z64: Tensor, params: list[Tensor]):
    J = dense_jacobian(decoder, z64)
    value = torch.linalg.slogdet(J.transpose(1, 2) @ J)[1]
    return value.detach(), grads(value, [*params, z64]), J.detach()


def make_problem(
    name: str,
    *,
    d: int | None = None,
    seed: int = 0,
    truth: bool = True,
    batch: int | None = None,
    device: str = "cpu",
) -> Problem:
    """Build the named problem in float32 with its float64 truth.

    Arguments:
        name: a key of :data:`PROBLEMS`.
        d: another latent dimension (MLP problems; the d-study).
        seed: seeds the weights and the latents.
        truth: compute the float64 dense truth (else its fields are empty).
        batch: another batch size B (the verification batch of the flows).
        device: where the float32 decoder and z live (the truth is computed on the CPU).
    """
    if name not in PROBLEMS:
        raise ValueError(f"problem must be one of {sorted(PROBLEMS)}, got {name!r}")
    spec = PROBLEMS[name]
    if d is not None or batch is not None:
        spec = replace(spec, d=spec.d if d is None else d, B=spec.B if batch is None else batch)
    g = torch.Generator().manual_seed(seed + 1)
    z64 = torch.randn(spec.B, spec.d, generator=g, dtype=torch.float64, requires_grad=True)
    model = None
    if spec.kind == "mlp":
        decoder64 = mlp_decoder(spec.d, spec.D, hidden=spec.hidden, dtype=torch.float64, seed=seed)
        params64 = list(decoder64.parameters())
    elif spec.kind == "flow":
        model = _build_model(spec, seed)
        decoder64 = flow_decoder(model)
        params64 = list(model.f.parameters())
    else:
        raise ValueError(f"spec.kind must be 'mlp' or 'flow', got {spec.kind!r}")
    net64 = model if model is not None else decoder64
    value, truth_grads, J = torch.empty(0), [], None
    if truth:
        value, truth_grads, J = _truth(decoder64, z64, params64)
    net = (copy.deepcopy(net64) if truth else net64).float().to(device)
    decoder = flow_decoder(net) if model is not None else net
    params = list(net.f.parameters()) if model is not None else list(net.parameters())
    z = z64.detach().float().to(device).requires_grad_(True)
    return Problem(
        name,
        spec,
        decoder,
        z,
        value,
        truth_grads,
        params=params,
        model=net if model is not None else None,
        decoder64=decoder64 if truth else None,
        params64=params64 if truth else [],
        z64=z64 if truth else None,
        J64=J,
    )


SUITES: dict[str, list[str]] = {
    "standard": ["mlp-16-784", "mlp-64-784", "flow-miniboone", "flow-power", "flow-mnist"],
    "quick": ["quick", "quick-flow", "quick-image"],
}
"""The problems of each suite size."""

STUDY_D: dict[str, tuple[str, tuple[int, ...]]] = {
    "standard": ("mlp-16-784", (2, 4, 8, 16, 32, 64, 128)),
    "quick": ("quick", (2, 3)),
}
"""The exact-vs-CG study: the base problem (its D, B and hidden widths) and the values of d."""


_ENCODERS: dict[tuple, dict[str, Tensor]] = {}
"""Trained MLP encoders of this process (state dicts), by problem sizes and training seeds."""


def mlp_encoder(problem: Problem, *, steps: int = 400, seed: int = 0) -> nn.Module:
    """An MLP encoder D -> reversed(hidden) -> d trained to invert the problem's MLP decoder,
    the FIF surrogate's stand-in for the pseudo-inverse.

    Trained by Adam (lr 1e-3, ``steps`` batches of 256 latents z ~ N(0, I), loss ‖enc(dec(z)) -
    z‖²) on the CPU, seeded, so every process of a run trains the same one; kept for the rest of
    the process under a key of the problem's sizes and the seeds (the batch B is not part of
    it: the timing and the verification batches share their encoder).

    Arguments:
        problem: an MLP problem (float32 decoder).
        steps, seed: training length and seed.

    Returns:
        The float32 encoder, on the problem's device, parameters not requiring grad.
    """
    spec = problem.spec
    if spec.kind != "mlp":
        raise ValueError(f"problem must be an MLP problem, got kind {spec.kind!r}")
    hidden = tuple(reversed(spec.hidden))
    encoder = mlp_decoder(spec.D, spec.d, hidden=hidden, dtype=torch.float32, seed=seed + 7)
    key = (problem.name, spec.d, spec.D, hidden, seed, steps)
    if key not in _ENCODERS:
        g = torch.Generator().manual_seed(seed + 11)
        opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)
        decoder = copy.deepcopy(problem.decoder).cpu()
        for _ in range(steps):
            z = torch.randn(256, spec.d, generator=g)
            with torch.no_grad():
                x = decoder(z)
            loss = ((encoder(x) - z) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        _ENCODERS[key] = copy.deepcopy(encoder.state_dict())
    encoder.load_state_dict(_ENCODERS[key])
    encoder.requires_grad_(False)
    return encoder.to(problem.z.device)


def problem_encoder(problem: Problem) -> Callable[[Tensor], Tensor]:
    """The FIF encoder of a problem: the flow's left inverse ``model.encode``, or for an MLP
    decoder the trained :func:`mlp_encoder`."""
    if problem.model is not None:
        return problem.model.encode
    return mlp_encoder(problem)


def pseudo_inverse_encoder(
    decoder: Callable[[Tensor], Tensor], z: Tensor
) -> Callable[[Tensor], Tensor]:
    """An encoder whose Jacobian at x_b = decoder(z)_b is exactly J(z_b)⁺, the pseudo-inverse:
    e(x)_b = z_b + J⁺ (x_b - decoder(z)_b), per sample (rows of x in z's order, each repeated
    K times in a row as :func:`harness.baselines.logdet_fif` does).

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d) latents.

    Returns:
        A callable mapping (B·K, D) to (B·K, d).
    """
    with torch.no_grad():
        z0 = z.detach()
        x0 = decoder(z0)
        P = torch.linalg.pinv(dense_jacobian(decoder, z0))
    B = z0.shape[0]

    def encoder(x: Tensor) -> Tensor:
        if x.shape[0] % B:
            raise ValueError(f"x must have a multiple of B = {B} rows, got {x.shape[0]}")
        K = x.shape[0] // B
        dx = (x - x0.repeat_interleave(K, 0)).unsqueeze(-1)
        return z0.repeat_interleave(K, 0) + (P.repeat_interleave(K, 0) @ dx).squeeze(-1)

    return encoder
