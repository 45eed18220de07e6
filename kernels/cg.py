"""One fused conjugate-gradient step for many small systems: ``cg_update`` (the reference, and
the spec of its semantics, is ``cg_update`` of ``rnf_fast.ops.reference``; the launcher takes
the CG state's tensors, and ``rnf_fast.ops.triton`` passes those of a ``CGState``).

One launch per iteration, no host synchronisation: each program advances BLOCK_N systems, in
three sweeps over d (pᵀAp; x, r and rᵀr; the new direction p), with the per-system stop, the
breakdown flag, the step count and the Lanczos coefficients α, β of column ``it`` written in
the same launch. The state's tensors are updated in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["BLOCK_D_CHOICES", "BLOCK_ELEMENTS", "DTYPES", "NUM_WARPS", "cg_update"]

BLOCK_D_CHOICES = (16, 32, 64, 128)  # the first >= d, else 128 with sweeps in chunks
BLOCK_ELEMENTS = 2048  # BLOCK_N · BLOCK_D per program
NUM_WARPS = {torch.float32: 4, torch.float64: 8}  # float64 at 4 warps spills registers (sm_90)
DTYPES = (torch.float32, torch.float64)


@triton.jit(do_not_specialize=["it"])
def _cg_update_kernel(
    x_ptr,
    r_ptr,
    p_ptr,
    ap_ptr,
    rr_ptr,
    bb_ptr,
    active_ptr,
    breakdown_ptr,
    steps_ptr,
    alphas_ptr,
    betas_ptr,
    alpha_ptr,
    N,
    d,
    max_iter,
    it,
    tol2: tl.float64,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = n < N
    cols = tl.arange(0, BLOCK_D)

    pAp = tl.zeros((BLOCK_N,), dtype=dtype)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + cols
        mask = n_ok[:, None] & (c < d)[None, :]
        off = n[:, None] * d + c[None, :]
        p = tl.load(p_ptr + off, mask=mask, other=0.0)
        ap = tl.load(ap_ptr + off, mask=mask, other=0.0)
        pAp += tl.sum(p * ap, axis=1)

    active = tl.load(active_ptr + n, mask=n_ok, other=0) != 0
    ok = active & (pAp > 0)  # NaN curvature is a breakdown too
    rr = tl.load(rr_ptr + n, mask=n_ok, other=1.0)
    alpha = tl.where(ok, rr / tl.where(ok, pAp, 1.0), 0.0)

    # Every system is updated, as in the reference (x + 0·p keeps NaN in p visible).
    rr_new = tl.zeros((BLOCK_N,), dtype=dtype)
    for c0 in range(0, d, BLOCK_D):
        c = c0 + cols
        mask = n_ok[:, None] & (c < d)[None, :]
        off = n[:, None] * d + c[None, :]
        p = tl.load(p_ptr + off, mask=mask, other=0.0)
        ap = tl.load(ap_ptr + off, mask=mask, other=0.0)
        x = tl.load(x_ptr + off, mask=mask, other=0.0) + alpha[:, None] * p
        r = tl.load(r_ptr + off, mask=mask, other=0.0) - alpha[:, None] * ap
        tl.store(x_ptr + off, x, mask=mask)
        tl.store(r_ptr + off, r, mask=mask)
        rr_new += tl.sum(r * r, axis=1)
    # The last sweep rereads r: make this program's stores visible to all of its threads.
    tl.debug_barrier()

    rr_new = tl.where(ok, rr_new, rr)
    beta = tl.where(ok, rr_new / tl.where(ok, rr, 1.0), 0.0)
    bb = tl.load(bb_ptr + n, mask=n_ok, other=0.0)
    still = ok & (rr_new > tl.cast(tol2, dtype) * bb)

    for c0 in range(0, d, BLOCK_D):
        c = c0 + cols
        mask = (n_ok & still)[:, None] & (c < d)[None, :]
        off = n[:, None] * d + c[None, :]
        p = tl.load(p_ptr + off, mask=mask, other=0.0)
        r = tl.load(r_ptr + off, mask=mask, other=0.0)
        tl.store(p_ptr + off, r + beta[:, None] * p, mask=mask)

    breakdown = tl.load(breakdown_ptr + n, mask=n_ok, other=0) != 0
    tl.store(breakdown_ptr + n, breakdown | (active & ~ok), mask=n_ok)
    steps = tl.load(steps_ptr + n, mask=n_ok, other=0)
    tl.store(steps_ptr + n, steps + ok.to(steps.dtype), mask=n_ok)
    tl.store(alphas_ptr + n * max_iter + it, alpha, mask=n_ok)
    tl.store(betas_ptr + n * max_iter + it, beta, mask=n_ok)
    tl.store(rr_ptr + n, rr_new, mask=n_ok)
    tl.store(active_ptr + n, still, mask=n_ok)
    tl.store(alpha_ptr + n, alpha, mask=n_ok)


def _check(tensors: dict[str, Tensor], Ap: Tensor, it: int) -> None:
    x, alphas = tensors["x"], tensors["alphas"]
    if x.dim() != 2:
        raise ValueError(f"x must be (N, d), got {tuple(x.shape)}")
    N, d = x.shape
    if Ap.shape != (N, d):
        raise ValueError(f"Ap must be (N, d) = {(N, d)}, like p, got {tuple(Ap.shape)}")
    if alphas.dim() != 2 or not 0 <= it < alphas.shape[1]:
        raise ValueError(
            f"it = {it} is past the Lanczos buffers (alphas of shape {tuple(alphas.shape)}: "
            "it must be in [0, max_iter))"
        )
    dtype, device = x.dtype, x.device
    if dtype not in DTYPES:
        raise TypeError(f"x must be float32 or float64, got {dtype}")
    want = {"active": torch.bool, "breakdown": torch.bool, "steps": torch.int64}
    for name, t in tensors.items():
        kind = want.get(name, dtype)
        if t.dtype != kind or t.device != device or not t.is_contiguous():
            raise TypeError(
                f"{name} must be a contiguous {kind} tensor on {device}, got {t.dtype} on "
                f"{t.device} (contiguous: {t.is_contiguous()})"
            )


def cg_update(
    x: Tensor,
    r: Tensor,
    p: Tensor,
    rr: Tensor,
    bb: Tensor,
    active: Tensor,
    breakdown: Tensor,
    steps: Tensor,
    alphas: Tensor,
    betas: Tensor,
    Ap: Tensor,
    it: int,
    tol: float,
) -> Tensor:
    """Advance every active system by one CG step, given A p; update the tensors in place.

    Same semantics as the plain-PyTorch ``cg_update`` of rnf_fast (``rnf_fast.ops.reference``,
    on a state holding these tensors): per-system stop on ‖r‖ <= tol · ‖b‖, breakdown on
    pᵀAp <= 0 (or NaN), inactive systems frozen, column ``it`` of ``alphas`` / ``betas`` written.
    The caller advances its step counter.

    Arguments:
        x, r, p: (N, d) solution, residual and search direction (float32 or float64).
        rr, bb: (N,) rᵀr and bᵀb, in the same dtype.
        active, breakdown: (N,) bool flags; steps: (N,) int64 step counts.
        alphas, betas: (N, max_iter) the Lanczos coefficients.
        Ap: (N, d) the operator applied to p (cast to p's dtype).
        it: the column of ``alphas`` / ``betas`` this step writes, in [0, max_iter).
        tol: relative residual tolerance.
        All but Ap contiguous, on one device.

    Returns:
        (N,) the step sizes α of this step (0 for inactive systems).
    """
    tensors = {
        "x": x,
        "r": r,
        "p": p,
        "rr": rr,
        "bb": bb,
        "active": active,
        "breakdown": breakdown,
        "steps": steps,
        "alphas": alphas,
        "betas": betas,
    }
    _check(tensors, Ap, it)
    N, d = x.shape
    Ap = Ap.to(x.dtype).contiguous()
    alpha = torch.empty_like(rr)
    if N > 0:
        block_d = next((b for b in BLOCK_D_CHOICES if b >= d), BLOCK_D_CHOICES[-1])
        block_n = BLOCK_ELEMENTS // block_d
        _cg_update_kernel[(triton.cdiv(N, block_n),)](
            x,
            r,
            p,
            Ap,
            rr,
            bb,
            active,
            breakdown,
            steps,
            alphas,
            betas,
            alpha,
            N,
            d,
            alphas.shape[1],
            it,
            float(tol) * float(tol),
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            num_warps=NUM_WARPS[x.dtype],
        )
    return alpha
