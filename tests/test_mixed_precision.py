"""Mixed precision: bf16 and fp16 decoders, and float32 decoders under a bf16 ``torch.autocast``,
against the float64 truth; the Gram matrix, Cholesky, CG and Lanczos kept in float32 or float64
outside autocast; the singular floors at the precision of the decoder's products.

The tolerance. The decoder's 16-bit products round J to Ĵ = J + E with ‖E‖_F <= γ u ‖J‖_F, where
u is the unit roundoff (2⁻⁸ for bf16, 2⁻¹¹ for fp16) and γ counts the 16-bit roundings on a
tangent's path: 4 in the two-layer decoders here (the cast of the input, a GEMM, the activation
scale, a GEMM). To first order log det(ĴᵀĴ) - log det(JᵀJ) = 2 tr(J⁺E), so

    |value error| <= 2 ‖J⁺‖_F ‖E‖_F <= 2 γ u κ_F(J),       κ_F(J) = ‖J‖_F ‖J⁺‖_F >= d,

per sample. The gradient 2 tr(J⁺ ∂J) moves by the same relative amount (J⁺ and ∂J both carry
E), so its relative error (over z and every parameter, Frobenius) gets 2 γ u max_b κ_F(J_b). CG's
products Ĵᵀ(Ĵ p) perturb A by JᵀE₁ + E₂ᵀJ, whose first-order effect on log det is the same
tr(J⁺E₁) + tr(J⁺E₂): the same bound, once CG has run long enough (16-bit products lose the
orthogonality that makes d iterations exact: the CG runs take 3d, with full probes √d e_k and
tol 0, so that the stochastic value and gradient equal the exact ones). The flow's decoder has
two couplings, each a two-layer conditioner and an elementwise map: γ = 8.

Measured here (bf16, fp16, bf16 autocast; exact and CG): the value within 1.4 u κ_F(J) (2.3 for
the flow), a sixth of the bound or less, and the gradient within 0.52 u κ_F (a worst-case bound:
rounding errors partly cancel). The bound still catches the slips it is here for: a gradient
missing the surrogate's factor 2 is 50% off (each test asserts that its bound is below that),
and a Gram matrix formed in 16 bits fails on a problem where J is exact in bf16
(``test_a_gram_formed_in_16_bits_would_fail``).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import rnf_fast
from rnf_fast.engine.checks import pivot_floor, ritz_floor
from rnf_fast.models import RectangularFlow
from rnf_fast.ops import reference
from rnf_fast.testing import (
    SinSoftplusDecoder,
    dense_jacobian,
    dense_logdet,
    grads,
    mlp_decoder,
    rel_error,
)

B = 6
MODES = {  # mode -> (dtype of the decoder and z, autocast dtype or None)
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
}


def _unit_roundoff(mode: str) -> float:
    dtype, autocast = MODES[mode]
    return torch.finfo(autocast or dtype).eps / 2


# Each problem: (decoder in float64, d). Well-conditioned (κ_F(J) <= 10.4, κ₂(J) <= 6.6), so
# that no sample is near the 16-bit singular floors and every bound is below 0.5.


def _mlp(seed: int) -> tuple[nn.Module, int]:
    # An nn.Sequential MLP: the explicit linearization of rnf_fast.linearize.modules.
    return mlp_decoder(4, 24, hidden=(24,), seed=seed), 4


def _sin(seed: int) -> tuple[nn.Module, int]:
    # Not an MLP: the generic torch.func linearization.
    return SinSoftplusDecoder(4, 12, seed=seed), 4


def _flow(seed: int) -> tuple[nn.Module, int]:
    # The decoder of a rectangular flow: the explicit flow linearization (couplings, LU linear,
    # ActNorm), its parameters moved off their initial (linear) values.
    model = RectangularFlow({"D": 8, "d": 3, "f_layers": 2, "h_layers": 1, "f_hidden": (16,)})
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.f.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.decoder, 3


PROBLEMS = {"mlp": _mlp, "sin": _sin, "flow": _flow}


def _call(decoder, z, method, autocast, **kwargs):
    """logdet_grad at z (a fresh leaf), under autocast when asked; no singular warning allowed."""
    d = z.shape[1]
    if method == "cg":
        # Full probes √d e_k (Σ v vᵀ / K = I) run to 3d iterations: the exact estimate.
        probes = d**0.5 * torch.eye(d, dtype=z.dtype, device=z.device).expand(z.shape[0], d, d)
        kwargs.update(probes=probes, tol=0.0, max_iter=3 * d)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*numerically singular")
        warnings.filterwarnings("ignore", message="CG reached max_iter")  # tol 0 is never met
        if autocast is None:
            return rnf_fast.logdet_grad(decoder, z, method, return_info=True, **kwargs)
        with torch.autocast(z.device.type, dtype=autocast):
            return rnf_fast.logdet_grad(decoder, z, method, return_info=True, **kwargs)


def _truth(decoder64, z64):
    """The float64 truth: log det(JᵀJ) by slogdet of the dense J, its gradient with respect to z
    and the parameters, and κ_F(J) per sample."""
    z = z64.clone().requires_grad_(True)
    value = dense_logdet(decoder64, z)
    gradient = grads(value, [z, *decoder64.parameters()])
    with torch.no_grad():
        J = dense_jacobian(decoder64, z64)
    kappa_F = J.norm(dim=(1, 2)) * torch.linalg.pinv(J).norm(dim=(1, 2))
    return value.detach(), torch.cat([g.flatten() for g in gradient]), kappa_F


@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_value_and_gradient_match_the_float64_truth(problem, mode, method):
    # Before: under autocast the MLP raised (its output is bf16, z float32) and the flow's CG
    # raised in index_add_; a bf16 decoder had every sample flagged singular on the exact path.
    _check_against_truth(problem, mode, method, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_value_and_gradient_match_the_float64_truth_on_cuda(problem, mode, method):
    # The same rule with the decoder on a CUDA device (its kernels, cuBLAS's 16-bit GEMMs); the
    # truth is computed on the CPU in float64.
    _check_against_truth(problem, mode, method, "cuda")


def _check_against_truth(problem: str, mode: str, method: str, device: str) -> None:
    dtype, autocast = MODES[mode]
    u = _unit_roundoff(mode)
    gamma = 8 if problem == "flow" else 4
    for seed in range(2):
        decoder, d = PROBLEMS[problem](seed)
        decoder = decoder.to(dtype)
        z = torch.randn(B, d, generator=torch.Generator().manual_seed(seed)).to(dtype)
        # The truth of the decoder that ran: its (rounded) weights and z, in float64.
        value64, grad64, kappa_F = _truth(copy.deepcopy(decoder).double(), z.double())
        decoder, z = decoder.to(device), z.to(device).requires_grad_(True)
        value, info = _call(decoder, z, method, autocast)
        assert value.dtype == torch.float32  # the value rule: float32 at least
        assert info.linalg_dtype == torch.float64 and not bool(info.singular.any())
        bound = 2 * gamma * u * kappa_F
        err = (value.detach().cpu().double() - value64).abs()
        assert bool((err <= bound).all()), (
            f"seed {seed}: value error / (u κ_F) up to {float((err / (u * kappa_F)).max()):.2f}"
            f" > 2γ = {2 * gamma}"
        )
        inputs = [z, *decoder.parameters()]
        gradient = grads(value, inputs)
        assert all(g.dtype == x.dtype for g, x in zip(gradient, inputs))  # bf16 params: bf16 grads
        grad_bound = float(bound.max())
        assert grad_bound < 0.5  # the premise: a gradient missing its factor 2 fails the bound
        grad_err = rel_error(torch.cat([g.cpu().double().flatten() for g in gradient]), grad64)
        assert grad_err <= grad_bound, (
            f"seed {seed}: gradient error {grad_err:.3g} > bound {grad_bound:.3g}"
        )


def _parallel_columns(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """W (D, d) = (8, 3) whose entries are bf16 numbers (so a bf16 J is exact) and whose last
    two columns are 7.4° apart: scaled pivot 0.0145, above bf16's floor (10 eps)² = 0.0061, and
    κ(A) = 275, where A rounded to bf16 is 0.15 off in log det (the bound: 4e-4)."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(8, 3, generator=g, dtype=torch.float64)
    W[:, 2] = W[:, 1] + 0.16 * torch.randn(8, generator=g, dtype=torch.float64)
    W = W.to(torch.bfloat16).double()
    return W.to(dtype), torch.randn(B, 3, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("mode", ["bf16-autocast", "bf16"])
@pytest.mark.parametrize("path", ["factored", "tangents"])
def test_a_gram_formed_in_16_bits_would_fail(path, mode):
    # J is exact in bf16 here (a linear decoder whose weights are bf16 numbers), so the only
    # rounding left is that of A = JᵀJ and its Cholesky in float32 or above (backward stable:
    # δA <= c d u₃₂ ‖A‖): an error of at most 8 d u₃₂ κ₂(A). A Gram matrix formed in bf16 is off
    # by about u_bf16 · κ(A): the test asserts that this fails the bound. "factored": an
    # nn.Sequential linear decoder, whose A comes from SequentialLinearization.gram; "tangents":
    # a function, whose A is the engine's Gram of the d tangents. Under autocast the linear
    # algebra runs in float32 (linalg_dtype), the one case autocast could reach.
    dtype, autocast = MODES[mode]
    W, z = _parallel_columns(dtype)
    if path == "factored":
        decoder = nn.Sequential(nn.Linear(3, 8, bias=False)).to(dtype)
        with torch.no_grad():
            decoder[0].weight.copy_(W)
    else:

        def decoder(z):
            return z @ W.T

    A = W.double().T @ W.double()
    truth = torch.logdet(A).expand(B)
    bound = 8 * 3 * 2.0**-24 * float(torch.linalg.cond(A))
    A16 = (W.bfloat16().T @ W.bfloat16()).double()  # the Gram of the same J, formed in bf16
    assert abs(float(torch.logdet(A16)) - float(truth[0])) > bound  # the premise
    if autocast is None:
        value, info = rnf_fast.logdet_grad(decoder, z, "exact", return_info=True)
    else:
        with torch.autocast(z.device.type, dtype=autocast):
            value, info = rnf_fast.logdet_grad(
                decoder, z, "exact", linalg_dtype=torch.float32, return_info=True
            )
    assert info.exact.gram == path
    err = float((value.detach().double() - truth).abs().max())
    assert err <= bound, f"value error {err:.3g} > {bound:.3g}: A was rounded below float32"


class _Spy:
    """Records, for each call of the reference ops it wraps, the dtypes of the floating tensors
    it gets and returns and whether autocast was on."""

    OPS = ("gram", "cholesky_logdet", "cholesky_inverse", "cg_init", "cg_update")
    OPS += ("lanczos_logquad",)

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.OPS:
            monkeypatch.setattr(reference, name, self._wrap(name, getattr(reference, name)))

    def _wrap(self, name, op):
        def spied(*args, **kwargs):
            result = op(*args, **kwargs)
            tensors = [*args, *(result if isinstance(result, tuple) else (result,))]
            if isinstance(args[0], reference.CGState):
                tensors += [args[0].x, args[0].r, args[0].p]
            if isinstance(result, reference.CGState):
                tensors += [result.x, result.alphas]
            dtypes = {
                t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()
            }
            self.calls.append((name, dtypes, torch.is_autocast_enabled("cpu")))
            return result

        return spied


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_linear_algebra_runs_in_float32_outside_autocast(monkeypatch, method):
    # linalg_dtype=float32 is the case autocast would reach (it leaves float64 alone): the Gram
    # GEMM would come out in bf16, and the Cholesky, CG and Lanczos would see it.
    spy = _Spy(monkeypatch)
    decoder = _sin(0)[0].float()
    z = torch.randn(B, 4)
    options = rnf_fast.CG(probes=2, tol=0.1) if method == "cg" else rnf_fast.Exact()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rnf_fast.logdet_grad(decoder, z, options, backend="torch", linalg_dtype=torch.float32)
    names = {name for name, _, _ in spy.calls}
    if method == "exact":
        expected = {"gram", "cholesky_logdet", "cholesky_inverse"}
    else:
        expected = {"cg_init", "cg_update", "lanczos_logquad"}
    assert expected <= names, f"the spy saw {sorted(names)}"
    for name, dtypes, autocast_on in spy.calls:
        assert not autocast_on, f"{name} ran under autocast"
        assert dtypes <= {torch.float32, torch.float64}, f"{name} saw {dtypes}"


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_products_run_under_the_callers_autocast(monkeypatch, method):
    # The other half of the rule: the decoder's tangents are what autocast makes of them (bf16
    # GEMMs for a float32 MLP), not float32 products computed outside the caller's region.
    from rnf_fast.linearize.modules import SequentialLinearization

    seen = []
    for name in ("jvp", "vjp", "jvp_hidden"):
        original = getattr(SequentialLinearization, name)

        def spied(self, *args, _original=original, _name=name, **kwargs):
            result = _original(self, *args, **kwargs)
            tangents = result[0] if isinstance(result, tuple) else result  # jvp_hidden: (M v, W)
            seen.append((_name, tangents.dtype, torch.is_autocast_enabled("cpu")))
            return result

        monkeypatch.setattr(SequentialLinearization, name, spied)
    decoder = _mlp(0)[0].float()
    options = rnf_fast.CG(probes=2, tol=0.1) if method == "cg" else rnf_fast.Exact()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rnf_fast.logdet_grad(decoder, torch.randn(B, 4, requires_grad=True), options)
    assert seen, "no product went through the MLP's linearization"
    assert all(dtype == torch.bfloat16 and on for _, dtype, on in seen), seen


def _rank_deficient(dtype, seed):
    # A 3-32-8 tanh MLP whose first layer has rank 2 < d = 3 (as tests/engine/test_singular.py).
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    with torch.no_grad():
        w = mlp[0].weight
        w[:, 2] = -1.7 * w[:, 0] - 0.3 * w[:, 1]
    return mlp.to(dtype), torch.randn(16, 3).to(dtype)


def _healthy(dtype, seed):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 8))
    return mlp.to(dtype), torch.randn(16, 3).to(dtype)


def _rank1_linear(dtype, seed):
    # The second weight column a multiple of the first (rank 1 < d = 2), exactly in 16 bits too.
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(2, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 2, generator=g).to(torch.bfloat16))
        lin.weight[:, 1] = 0.5 * lin.weight[:, 0]
    return lin.to(dtype), torch.randn(16, 2, generator=g).to(dtype)


def _flags(decoder, z, autocast, method="exact"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if autocast is None:
            _, info = rnf_fast.logdet_grad(decoder, z, method, return_info=True)
        else:
            with torch.autocast(z.device.type, dtype=autocast):
                _, info = rnf_fast.logdet_grad(decoder, z, method, return_info=True)
    messages = [str(w.message) for w in caught if "rank deficient" in str(w.message)]
    return info.singular, messages


@pytest.mark.parametrize("mode", list(MODES))
def test_16bit_floors_flag_rank_deficient_and_spare_healthy_decoders(mode):
    # Before: the floor (100 eps_bf16)² = 0.61 flagged every sample of a bf16 decoder, healthy
    # ones included, and CG's 3 eps_bf16 flagged κ(J) > 6.5. Now 16-bit products have c = 10
    # (SINGULAR_C_16BIT) on both paths. CG's check is a screen at 16 bits (it misses about 5% of
    # the rank-deficient MLP's samples, see ritz_floor): it is held to the rank-1 decoder.
    dtype, autocast = MODES[mode]
    name = str(autocast or dtype).removeprefix("torch.")
    for seed in range(10):
        singular, messages = _flags(*_rank_deficient(dtype, seed), autocast)
        assert bool(singular.all()), f"seed {seed}: {singular.tolist()}"
        assert len(messages) == 1 and f"rank deficient to {name} precision" in messages[0]
        singular, messages = _flags(*_rank1_linear(dtype, seed), autocast, "cg")
        assert bool(singular.all()), f"seed {seed}, cg: {singular.tolist()}"
        for method in ("exact", "cg"):
            singular, messages = _flags(*_healthy(dtype, seed), autocast, method)
            assert not bool(singular.any()) and not messages, f"seed {seed}, {method}"


def test_autocast_judges_singularity_at_the_autocast_precision():
    # Columns 1.4° apart (pivot sine 0.025, κ(J) = 80): resolved in float32 (its floor flags
    # only sines below 100 eps = 1.2e-5) but not by bf16 products (floor 10 eps = 0.078). Before,
    # the floor followed z's dtype (float32) under autocast too.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 2, generator=g)
    W[:, 1] = W[:, 0] + 0.035 * torch.randn(8, generator=g) * W[:, 0].norm() / 8**0.5
    z = torch.randn(B, 2, generator=g)
    singular, messages = _flags(lambda z: z @ W.T, z, None)
    assert not bool(singular.any()) and not messages
    singular, messages = _flags(lambda z: z @ W.T, z, torch.bfloat16)
    assert bool(singular.all()) and "rank deficient to bfloat16 precision" in messages[0]


def test_floors_of_16bit_products():
    for dtype in (torch.bfloat16, torch.float16):
        eps = torch.finfo(dtype).eps
        assert pivot_floor(dtype, torch.float64) == pytest.approx((10 * eps) ** 2)
        assert ritz_floor(dtype) == pytest.approx((10 * eps) ** 2)


def test_16bit_linalg_dtype_is_refused():
    decoder = _mlp(0)[0]
    with pytest.raises(ValueError, match="linalg_dtype must be torch.float32 or torch.float64"):
        rnf_fast.logdet_grad(
            decoder, torch.randn(2, 4, dtype=torch.float64), "exact", linalg_dtype=torch.bfloat16
        )
