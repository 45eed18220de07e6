"""Shared helpers for tests and benchmarks: random decoders, the closeness rule and the CG
agreement rule that every kernel-against-reference comparison uses (CPU, interpreter, GPU)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "assert_backend_equals_torch",
    "FoldedFlow",  # noqa: F822 (module __getattr__)
    "CG_FLOAT32_TOL",
    "GroupNormTangentReference",
    "NonVmappableDecoder",
    "SinSoftplusDecoder",
    "assert_within_2x",
    "cg_agreement",
    "dense_jacobian",
    "dense_logdet",
    "grads",
    "mlp_decoder",
    "rel_error",
    "slogdet_gram",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "softplus": nn.Softplus, "gelu": nn.GELU}


def mlp_decoder(
    d: int,
    D: int,
    *,
    hidden: tuple[int, ...] = (16,),
    activation: str = "tanh",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> nn.Sequential:
    """A random MLP decoder R^d -> R^D (Linear, activation, ..., Linear), seeded.

    Arguments:
        d, D: input and output dimensions.
        hidden: hidden layer widths.
        activation: one of ``"tanh"``, ``"relu"``, ``"softplus"``, ``"gelu"``.
        dtype: parameter dtype.
        seed: initialisation seed.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
    g = torch.Generator().manual_seed(seed)
    sizes = (d, *hidden, D)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(_ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class SinSoftplusDecoder(nn.Module):
    """A non-MLP decoder: x = [W z + sin(U z), softplus(V z) · (1 + z₀²)], D = 2·m."""

    def __init__(self, d: int, m: int, *, dtype: torch.dtype = torch.float64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(m, d, generator=g, dtype=dtype))
        self.U = nn.Parameter(0.5 * torch.randn(m, d, generator=g, dtype=dtype))
        self.V = nn.Parameter(torch.randn(m, d, generator=g, dtype=dtype))

    def forward(self, z: Tensor) -> Tensor:
        a = z @ self.W.T + torch.sin(z @ self.U.T)
        b = nn.functional.softplus(z @ self.V.T) * (1 + z[:, :1] ** 2)
        return torch.cat([a, b], dim=1)


class _CubicActivation(torch.autograd.Function):
    """x + x³/10 with hand-written backward and JVP and no vmap rule, like many custom ops."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return x + 0.1 * x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * (1 + 0.3 * x**2)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return tangent * (1 + 0.3 * x**2)


class NonVmappableDecoder(nn.Module):
    """An MLP decoder that ``torch.func.vmap`` cannot batch: its activation is a custom
    ``autograd.Function`` with a JVP but no vmap rule, as many hand-written ops are."""

    def __init__(self, d: int, D: int, *, dtype: torch.dtype = torch.float64, seed: int = 0):
        super().__init__()
        self.net = mlp_decoder(d, D, hidden=(12,), dtype=dtype, seed=seed)

    def forward(self, z: Tensor) -> Tensor:
        return self.net[2](_CubicActivation.apply(self.net[0](z)))


def slogdet_gram(J: Tensor) -> Tensor:
    """log det(JᵀJ) per sample from J (..., D, d), by ``slogdet``; differentiable."""
    return torch.linalg.slogdet(J.transpose(-1, -2) @ J)[1]


def dense_jacobian(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """J per sample, (B, D, d), by forward mode one column at a time for the whole batch
    (rows are independent); no vmap, so it serves any differentiable decoder."""
    cols = []
    for j in range(z.shape[1]):
        e = torch.zeros_like(z)
        e[:, j] = 1
        cols.append(torch.func.jvp(decoder, (z,), (e,))[1])
    return torch.stack(cols, dim=-1)


def dense_logdet(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """The dense truth: log det(JᵀJ) per sample from the full Jacobian, in z's dtype
    (call it with float64 decoder and z for the reference value); differentiable.

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d).

    Returns:
        (B,) log dets.
    """
    return slogdet_gram(dense_jacobian(decoder, z))


def rel_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual - expected‖ / ‖expected‖ (Frobenius), as a float."""
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def grads(value: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """Gradients of ``value.sum()`` with respect to ``inputs`` (zeros where unused)."""
    gs = torch.autograd.grad(value.sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def assert_within_2x(
    name: str, got: Tensor, torch_run: Tensor, truth: Tensor, torch_truth: Tensor | None = None
) -> tuple[float, float]:
    """Check the closeness rule: rel_error(got, truth) <= 2 · rel_error(torch_run, torch_truth).

    A kernel's error against a higher-precision truth may be at most twice that of the PyTorch
    reference run at the kernel's precision: the tolerance follows the conditioning of the
    problem, not a magic number. The bound never goes below the unit roundoff u = eps / 2 of
    ``got``'s dtype, the error of a correctly rounded result: a reference that happens to be
    exact cannot demand better than correct rounding.

    Arguments:
        name: what is compared, for the failure message.
        got: the kernel's result.
        torch_run: the reference's result at the kernel's precision.
        truth: the same quantity in higher precision (or exact).
        torch_truth: the truth for ``torch_run`` when it differs from ``truth``: a step of a
            recurrence is judged on its own inputs, each run's own earlier results.

    Returns:
        (kernel error, PyTorch error), relative in the Frobenius norm.

    Example:
        >>> truth = torch.linspace(1, 2, 5, dtype=torch.float64)
        >>> assert_within_2x("copy", truth.float(), truth.float(), truth)[0] < 1e-7
        True
    """
    if got.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != {tuple(truth.shape)}")
    torch_truth = truth if torch_truth is None else torch_truth
    err_kernel = rel_error(got.double(), truth.double())
    err_torch = rel_error(torch_run.double(), torch_truth.double())
    bound = max(2 * err_torch, torch.finfo(got.dtype).eps / 2)
    if not err_kernel <= bound:
        raise AssertionError(
            f"{name}: kernel error {err_kernel:.3e} exceeds 2 x the PyTorch error "
            f"{err_torch:.3e} (bound {bound:.3e}) against the truth"
        )
    return err_kernel, err_torch


CG_FLOAT32_TOL = 1e-3
"""The tolerance float32 CG comparisons run at: well above float32's floor, where a kernel's
own rounding cannot decide whether a system converges (at 1e-5, a C++ kernel and the PyTorch
reference stopped 92 of 1,024 float32 systems of size 16 at different steps)."""


def cg_agreement(
    update: Callable[..., Tensor],
    A: Tensor,
    b: Tensor,
    *,
    tol: float | None = None,
    max_iter: int | None = None,
) -> dict[str, float]:
    """Solve the systems A x = b with a backend's ``cg_update`` and with the reference's, and
    check that they agree by the rule every GPU and kernel comparison follows:

    - float64: identical per-system step counts and breakdown flags, x within the closeness
      rule against the float64 solution;
    - float32 (only at ``tol >= CG_FLOAT32_TOL``): x and the Lanczos log-quadrature value
      bᵀ log(A) b within the closeness rule against their float64 truths. Per-system step
      counts may differ by rounding: the number that differ is reported, not asserted.

    Arguments:
        update: the backend's ``cg_update(state, Ap, tol)``.
        A: (N, d, d) SPD matrices (float32 or float64).
        b: (N, d) right-hand sides, same dtype and device.
        tol: relative residual tolerance (default: 1e-6 in float64, CG_FLOAT32_TOL in float32;
            at 1e-10 float64 runs of 16-wide systems also split, on 28 of 1,024).
        max_iter: iteration cap (default 3 d: enough for every well-conditioned system).

    Returns:
        ``steps_differ`` (systems whose step counts differ), ``max_step_gap``, ``x_err`` and
        ``x_err_torch``, ``logquad_err`` and ``logquad_err_torch`` (relative errors against the
        float64 truths), ``iterations`` (the mean steps of the reference).

    Raises:
        AssertionError: when the rule is broken; ValueError: float32 below CG_FLOAT32_TOL.
    """
    from .ops import reference

    f64 = A.dtype == torch.float64
    tol = (1e-6 if f64 else CG_FLOAT32_TOL) if tol is None else tol
    if not f64 and tol < CG_FLOAT32_TOL:
        raise ValueError(
            f"tol must be >= {CG_FLOAT32_TOL} for float32 systems (rounding decides the "
            f"stopping step below it), got {tol}"
        )
    N, d = b.shape
    max_iter = 3 * d if max_iter is None else max_iter
    states = {}
    for label, step in (("backend", update), ("torch", reference.cg_update)):
        state = reference.cg_init(b, max_iter)
        for _ in range(max_iter):
            step(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), tol)
        states[label] = state
    ours, ref = states["backend"], states["torch"]
    gap = (ours.steps - ref.steps).abs()
    if f64 and not (
        torch.equal(ours.steps, ref.steps) and torch.equal(ours.breakdown, ref.breakdown)
    ):
        raise AssertionError(
            f"cg_update: float64 step counts differ from the reference on {int((gap > 0).sum())} "
            f"of {N} systems"
        )
    A64, b64 = A.double(), b.double()
    x_err, x_err_torch = assert_within_2x("cg x", ours.x, ref.x, torch.linalg.solve(A64, b64))
    report = {
        "steps_differ": int((gap > 0).sum()),
        "max_step_gap": int(gap.max()) if N else 0,
        "x_err": x_err,
        "x_err_torch": x_err_torch,
        "iterations": float(ref.steps.double().mean()),
    }
    if not f64:
        lam, Q = torch.linalg.eigh(A64)
        qb = (Q.mT @ b64.unsqueeze(-1)).squeeze(-1)
        quad_truth = (qb**2 * lam.log()).sum(-1)
        quads = [reference.lanczos_logquad(s.alphas, s.betas, s.steps, s.bb) for s in (ours, ref)]
        report["logquad_err"], report["logquad_err_torch"] = assert_within_2x(
            "cg Lanczos value", *quads, quad_truth
        )
    return report


class GroupNormTangentReference:
    """GroupNorm's tangent rule in its plain form, differentiated by autograd: the spec that the
    fused rule of :mod:`rnf_fast.linearize.modules` is tested and timed against. Per group,
    jvp(t) = γ ⊙ (t - mean(t) - x̂ mean(x̂ ⊙ t)) / σ and vjp(w) = the same projection of γ ⊙ w.

    Arguments:
        xhat: (B, G, n) the normalised input per group.
        inv_std: (B, G, 1) 1/σ per group.
        weight: (C,) γ, or None.
        groups: G.
    """

    def __init__(self, xhat: Tensor, inv_std: Tensor, weight: Tensor | None, groups: int):
        self.xhat, self.inv_std, self.weight, self.groups = xhat, inv_std, weight, groups

    @classmethod
    def at(cls, gn: nn.GroupNorm, x: Tensor) -> tuple[Tensor, GroupNormTangentReference]:
        """The layer's output at x (B, C, ...) and the plain rule there (the primal and its
        factors are the linearization's own: only the tangent rule is under test)."""
        from .linearize.modules import group_norm_primal

        y, xhat, inv_std = group_norm_primal(gn, x)
        return y, cls(xhat, inv_std, gn.weight if gn.affine else None, gn.num_groups)

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
        """γ ⊙ P(t) / σ for tangents T (B, K, C, ...)."""
        return self._gamma(self._project(T))

    def vjp(self, C: Tensor) -> Tensor:
        """P(γ ⊙ w) / σ for cotangents C (B, K, C, ...)."""
        return self._project(self._gamma(C))


def __getattr__(name: str):
    # FoldedFlow subclasses the model: built on first use, so importing this module for the
    # engine's helpers does not load rnf_fast.models.
    if name == "FoldedFlow":
        return _folded_flow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _folded_flow() -> type:
    from .models import RectangularFlow

    class FoldedFlow(RectangularFlow):
        """A rectangular flow (d = 2) whose decoder is rank 1 on half of latent space: g(z) =
        f(pad(φ(z))) with φ(z) = z where z_1 > ``threshold`` and (t, t), t = z_1 + 2 z_2,
        elsewhere. There J = J_f [u, 2u] (u = (1, 1) padded) has rank 1, so JᵀJ is singular
        however f is trained; elsewhere J is f's on the first two coordinates, full rank. The
        singular samples are known without the engine: ``encode(x)[:, 0] <= threshold``.
        ``threshold = inf`` makes every sample singular. The decoder is a plain function (the
        engine's generic path: no explicit rule for φ).
        """

        def __init__(self, config, *, threshold: float = 0.0) -> None:
            super().__init__(config)
            self.threshold = threshold

        def decode(self, z: Tensor) -> Tensor:
            t = z[:, :1] + 2.0 * z[:, 1:2]
            folded = torch.cat([t, t], 1)
            return super().decode(torch.where(z[:, :1] > self.threshold, z, folded))

        @property
        def decoder(self):
            return self.decode

    FoldedFlow.__module__ = __name__
    return FoldedFlow


def assert_backend_equals_torch(backend: str, method: str, device: str = "cpu") -> None:
    """``logdet_grad`` through ``backend`` against the ``torch`` backend on a small float64 MLP
    (exact, or CG on fixed probes to tolerance 1e-10): the value within 1e-12, every gradient
    within 1e-10 (relative), and for CG the same iteration count per system."""
    from .engine import CG, Exact, logdet_grad

    torch.manual_seed(0)
    dec = mlp_decoder(5, 12, hidden=(16,)).to(device)
    z = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    probes = torch.randn(6, 3, 5, dtype=torch.float64, device=device)
    options = {"exact": Exact(), "cg": CG(probes=probes, tol=1e-10, max_iter=15)}[method]
    results = {}
    for name in ("torch", backend):
        value, info = logdet_grad(dec, z, options, backend=name, return_info=True)
        assert info.backend == name, (info.backend, name)
        results[name] = (value, grads(value, [z, *dec.parameters()]), info)
    (v_t, g_t, i_t), (v_b, g_b, i_b) = results["torch"], results[backend]
    assert rel_error(v_b.detach(), v_t.detach()) < 1e-12
    for a, b in zip(g_b, g_t):
        assert rel_error(a, b) < 1e-10
    if method == "cg":
        assert torch.equal(i_b.cg.iterations, i_t.cg.iterations)
