"""cg_update (Triton, interpreted) against rnf_fast.ops.reference.cg_update and an
extended-precision truth.

The steps run through ``launch_cg_update`` of rnf_fast.ops.triton, the adapter that passes a
CGState's tensors to the kernel's launcher and advances the state's step counter; the argument
checks are the launcher's own.

Each check starts from one CG state and takes one step with the kernel and with PyTorch at the
same precision. The discrete outcome (active, breakdown, steps) must equal the reference's; each
floating-point value obeys the closeness rule against its extended-precision truth, computed
stage by stage from that run's own earlier values (see ``_stage_truths``). States come from
running the reference, so every phase is covered: fresh systems, converging ones, a breakdown,
a system with b = 0 that never starts.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from rnf_fast.kernels.cg import cg_update as launch

from rnf_fast.ops import reference
from rnf_fast.ops.triton import launch_cg_update as cg_update
from rnf_fast.testing import assert_within_2x


def _systems(N, d, dtype, generator):
    """SPD A_i, except the last (negative definite: a breakdown at the first step), and
    right-hand sides (b_1 = 0: never starts). An indefinite A would bring pᵀAp near 0, whose
    cancellation (not the kernel) would then set every error compared."""
    G = torch.randn(N, d, d, generator=generator, dtype=torch.float64)
    A = G @ G.transpose(1, 2) / d + 0.5 * torch.eye(d, dtype=torch.float64)
    A[-1] = -torch.diag(torch.linspace(0.5, 1.0, d, dtype=torch.float64))
    b = torch.randn(N, d, generator=generator, dtype=torch.float64)
    b[1] = 0
    return A.to(dtype), b.to(dtype)


def _stage_truths(state, Ap, run):
    """Each value of one step, in extended precision, from the run's own earlier values.

    α from the state; x, r from the run's α; rᵀr from its r; β from its rᵀr; p from its r and
    β. A step amplifies the rounding of α (r - α Ap cancels), so comparing whole-step results
    would compare the luck of one rounding; stage by stage, each rounding is judged on the
    same inputs as PyTorch's. numpy longdouble has a 64-bit significand on x86-64, 2^11 times
    finer than float64.
    """
    L = lambda t: t.double().numpy().astype(np.longdouble)  # noqa: E731
    x0, r0, p0, ap, rr0 = L(state.x), L(state.r), L(state.p), L(Ap), L(state.rr)
    ok = state.active.numpy() & ((p0 * ap).sum(-1) > 0)
    alpha = np.where(ok, rr0 / np.where(ok, (p0 * ap).sum(-1), 1), 0)
    a, r = L(run["alpha"])[:, None], L(run["r"])
    rr = np.where(ok, (r * r).sum(-1), rr0)
    beta = np.where(ok, L(run["rr"]) / np.where(ok, rr0, 1), 0)
    still = run["still"].numpy()[:, None]
    p = np.where(still, r + L(run["beta"])[:, None] * p0, p0)
    out = {"alpha": alpha, "x": x0 + a * p0, "r": r0 - a * ap, "rr": rr, "beta": beta, "p": p}
    return {k: torch.from_numpy(v.astype(np.float64)) for k, v in out.items()}


def _unfused_step(state, Ap, tol):
    """The reference's step with x + α p and r - α Ap rounded twice (product, then sum).

    Triton's interpreter evaluates a·b + c with two roundings (tl.fma included), while
    PyTorch's CPU ``addcmul_`` in the reference fuses them: near convergence r - α Ap cancels
    and that one rounding decides the error of r, rᵀr and β. This PyTorch run at the same
    precision, without the fusion, sets the bound for the interpreted kernel. (Compiled for a
    GPU, the kernel's a·b + c contract into FMAs like the reference's; the CUDA test compares
    with ``reference.cg_update`` itself.)
    """
    pAp = (state.p * Ap).sum(-1)
    ok = state.active & (pAp > 0)
    alpha = torch.where(ok, state.rr / torch.where(ok, pAp, torch.ones_like(pAp)), 0.0)
    x = state.x + alpha[:, None] * state.p
    r = state.r - alpha[:, None] * Ap
    rr = torch.where(ok, (r * r).sum(-1), state.rr)
    beta = torch.where(ok, rr / torch.where(ok, state.rr, torch.ones_like(rr)), 0.0)
    still = ok & (rr > (tol * tol) * state.bb)
    p = torch.where(still[:, None], r + beta[:, None] * state.p, state.p)
    return {"x": x, "r": r, "p": p, "rr": rr, "alpha": alpha, "beta": beta, "still": still}


def _check_step(state, Ap, tol, label):
    it = state.it
    kern, ref = state.clone(), state.clone()
    alpha = cg_update(kern, Ap, tol)
    reference.cg_update(ref, Ap, tol)
    assert kern.it == ref.it == it + 1
    for name in ("active", "breakdown", "steps"):
        assert torch.equal(getattr(kern, name), getattr(ref, name)), f"{label}: {name} differs"
    assert torch.equal(kern.alphas[:, it], alpha)
    ours = {
        "x": kern.x,
        "r": kern.r,
        "p": kern.p,
        "rr": kern.rr,
        "alpha": alpha,
        "beta": kern.betas[:, it],
        "still": kern.active,
    }
    unfused = _unfused_step(state, Ap, tol)
    truth, torch_truth = (_stage_truths(state, Ap, run) for run in (ours, unfused))
    for name in ("alpha", "x", "r", "rr", "beta", "p"):
        assert_within_2x(
            f"{label} {name}", ours[name], unfused[name], truth[name], torch_truth[name]
        )


# (N, d): d below, at and past a power of two, and past the 128-wide chunk (every sweep loops);
# N never a multiple of the systems per program (d = 5: 128). Hundreds of systems per case: a
# value is a few roundings, so the errors compared are sums over many systems.
CASES = [(1000, 5), (600, 16), (600, 33), (100, 130)]

pytestmark = pytest.mark.skipif(
    np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps,
    reason="numpy longdouble is no wider than float64 here: no extended-precision truth",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_cg_update_matches_reference_at_every_step(case, dtype):
    N, d = case
    g = torch.Generator().manual_seed(N * 1000 + d)
    A, b = _systems(N, d, dtype, g)
    tol = 1e-4
    max_iter = min(d + 2, 6)
    state = reference.cg_init(b, max_iter)
    for it in range(max_iter):
        Ap = (A @ state.p.unsqueeze(-1)).squeeze(-1)
        _check_step(state, Ap, tol, f"N={N} d={d} {dtype} step {it}")
        reference.cg_update(state, Ap, tol)
    assert bool(state.breakdown[-1]), "the indefinite system must break down"
    assert not bool(state.active[1]) and int(state.steps[1]) == 0


def test_cg_update_keeps_nan_visible_in_frozen_systems():
    # As in the reference, a frozen system is still updated with α = 0: a non-finite A p there
    # shows up in r (0 · inf = NaN) instead of being silently masked.
    A, b = _systems(3, 4, torch.float32, torch.Generator().manual_seed(1))
    state = reference.cg_init(b, 4)
    Ap = (A @ state.p.unsqueeze(-1)).squeeze(-1)
    Ap[1] = float("inf")
    kern, ref = state.clone(), state.clone()
    with np.errstate(invalid="ignore"):  # the interpreter computes 0 · inf in numpy
        cg_update(kern, Ap, 1e-4)
    reference.cg_update(ref, Ap, 1e-4)
    assert torch.equal(kern.r.isnan(), ref.r.isnan()) and bool(kern.r[1].isnan().all())
    assert torch.equal(kern.breakdown, ref.breakdown)


def test_cg_with_the_kernel_solves_like_the_reference():
    N, d, tol = 6, 12, 1e-5
    A, b = _systems(N, d, torch.float64, torch.Generator().manual_seed(2))
    A, b = A[:-2], b[:-2]  # SPD systems only
    runs = {}
    for name, step in (("kernel", cg_update), ("reference", reference.cg_update)):
        state = reference.cg_init(b, 3 * d)
        while bool(state.active.any()) and state.it < 3 * d:
            step(state, (A @ state.p.unsqueeze(-1)).squeeze(-1), tol)
        true_res = (b - (A @ state.x.unsqueeze(-1)).squeeze(-1)).norm(dim=1) / b.norm(dim=1)
        runs[name] = (state, true_res.nan_to_num(0.0))
    (kern, res_k), (ref, res_r) = runs["kernel"], runs["reference"]
    assert torch.equal(kern.steps, ref.steps)
    assert bool((res_k <= 2 * torch.clamp(res_r, min=tol)).all()), (res_k, res_r)
    torch.testing.assert_close(
        reference.lanczos_logquad(kern.alphas, kern.betas, kern.steps, kern.bb),
        reference.lanczos_logquad(ref.alphas, ref.betas, ref.steps, ref.bb),
    )


def _launch_args(state, Ap):
    """The launcher's arguments for one step from ``state``."""
    s = state
    return (
        s.x,
        s.r,
        s.p,
        s.rr,
        s.bb,
        s.active,
        s.breakdown,
        s.steps,
        s.alphas,
        s.betas,
        Ap,
        s.it,
        1e-4,
    )


def test_cg_update_rejects_bad_input():
    state = reference.cg_init(torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match=r"Ap must be \(N, d\) = \(3, 4\)"):
        cg_update(state, torch.randn(3, 5), 1e-4)
    bad = replace(state, alphas=state.alphas.T.contiguous().T)
    with pytest.raises(TypeError, match="alphas must be a contiguous"):
        cg_update(bad, torch.randn(3, 4), 1e-4)
    args = list(_launch_args(state, torch.randn(3, 4)))
    args[7] = state.steps.int()
    with pytest.raises(TypeError, match="steps must be a contiguous torch.int64"):
        launch(*args)
    with pytest.raises(ValueError, match=r"x must be \(N, d\)"):
        launch(state.x[0], *_launch_args(state, torch.randn(3, 4))[1:])
    state.it = 2
    with pytest.raises(ValueError, match="past the Lanczos buffers"):
        cg_update(state, torch.randn(3, 4), 1e-4)
    assert state.it == 2  # a rejected step leaves the state as it was
