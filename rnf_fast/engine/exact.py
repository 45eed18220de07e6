"""The exact estimator: J from d forward-mode tangents, A = JᵀJ, Cholesky, log det A.

The surrogate is S = 2 Σ_k ⟨stopgrad(J A⁻¹ e_k), J e_k⟩ (V = I_d), whose gradient is exactly
∇ log det A; with a linearization that forms A without J (``lin.gram``), S = tr(stopgrad(A⁻¹) A)
instead, whose gradient tr(A⁻¹ ∂A) is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..ops.dispatch import Backend
from .checks import (
    OnSingular,
    check_jacobian_nonzero,
    check_lin_output,
    pivot_floor,
    report_singular,
)
from .estimator import Context, Estimate, tangent_inner
from .options import Exact
from .precision import accumulate_dtype

__all__ = ["ExactInfo", "estimate_exact"]


@dataclass
class ExactInfo:
    """The exact path's part of :class:`rnf_fast.LogdetInfo`.

    Attributes:
        gram: how A was formed: ``"tangents"`` (J from d tangents, then JᵀJ) or
            ``"factored"`` (A = Mᵀ(WᵀW)M without J, see ``SequentialLinearization.gram``).
        jitter: (B,) absolute jitter added to A before its Cholesky (0 where none was needed).
        chunk_size: tangents pushed per chunk (d when not chunked).
    """

    gram: Literal["tangents", "factored"]
    jitter: Tensor
    chunk_size: int


_BLOCK = 256
"""Columns of D cast up at a time: no full higher-precision copy of J is held (it would be the
largest buffer of the exact path)."""


def _gram(ops: Backend, JT: Tensor, ldtype: torch.dtype) -> Tensor:
    """A = JᵀJ in ``ldtype`` from JT (B, d, D), casting blocks of D at a time."""
    if JT.dtype == ldtype:
        return ops.gram(JT.transpose(1, 2))
    return sum(
        ops.gram(JT[:, :, s : s + _BLOCK].transpose(1, 2).to(ldtype))
        for s in range(0, JT.shape[2], _BLOCK)
    )


def _solve_rows(inv_A: Tensor, JT: Tensor) -> Tensor:
    """A⁻¹Jᵀ (B, d, D) in JT's dtype from A⁻¹ (B, d, d) in float32 or above: a 16-bit JT is
    cast up block by block and each product rounded once to 16 bits."""
    if JT.dtype == inv_A.dtype:
        return inv_A @ JT
    return torch.cat(
        [
            (inv_A @ JT[:, :, s : s + _BLOCK].to(inv_A.dtype)).to(JT.dtype)
            for s in range(0, JT.shape[2], _BLOCK)
        ],
        dim=2,
    )


def _factor(
    ops: Backend, A: Tensor, on_singular: OnSingular, jacobian_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Cholesky of A (B, d, d) with bounded jitter, and the samples that are numerically singular.

    A sample is singular when its factorisation fails, needs jitter, or has a scaled pivot
    l_i² / A_ii below :func:`~rnf_fast.engine.checks.pivot_floor` (the precision of J's dtype,
    ``jacobian_dtype``, and of A's): the float64 Cholesky of a float32 J that is rank deficient
    to float32 precision succeeds with a pivot at float32's rounding level, and its log det is
    then that rounding. With ``"nan"`` (``"raise"`` raises) every singular sample gets a NaN
    value; with ``"jitter"`` only those whose factorisation failed even with jitter do.

    Returns:
        (L, log det A, jitter (B,), singular (B,), failed (B,): NaN value, no gradient).
    """
    diag_A = torch.diagonal(A, dim1=-2, dim2=-1)
    check_jacobian_nonzero(not bool((diag_A != 0).any()))
    steps = ops.JITTER_STEPS if on_singular == "jitter" else ()
    L, value, jitter, cinfo = ops.cholesky_logdet(A, jitter_steps=steps)
    pivots2 = torch.diagonal(L, dim1=-2, dim2=-1) ** 2
    rho = (pivots2 / diag_A.clamp_min(torch.finfo(A.dtype).tiny)).amin(-1)
    floor = pivot_floor(jacobian_dtype, A.dtype)
    singular = (cinfo > 0) | (jitter > 0) | (rho < floor)
    failed = cinfo > 0 if on_singular == "jitter" else singular
    report_singular(
        singular,
        on_singular,
        "exact path: Cholesky pivots",
        dtype=jacobian_dtype,
        jittered=int((jitter > 0).sum()),
        nan=failed,
    )
    value = torch.where(failed, torch.full_like(value, float("nan")), value)
    return L, value, jitter, singular, failed


def _inverse_gram(ops: Backend, L: Tensor, singular: Tensor, dtype: torch.dtype) -> Tensor:
    """A⁻¹ (B, d, d) from its Cholesky factor L, in ``dtype``; zero for the ``singular`` samples
    (those with a NaN value), so they contribute no gradient."""
    d = L.shape[-1]
    if bool(singular.any()):
        L = torch.where(singular[:, None, None], torch.eye(d, dtype=L.dtype, device=L.device), L)
    inv = ops.cholesky_inverse(L).to(dtype)
    return torch.where(singular[:, None, None], torch.zeros_like(inv), inv)


def estimate_exact(options: Exact, ctx: Context) -> tuple[Estimate, ExactInfo]:
    """log det A per sample and the exact surrogate S.

    Arguments:
        options: the exact method's options (``chunk_size``).
        ctx: the call (linearization, z (B, d), backend, linalg dtype, ...).

    Returns:
        (the :class:`Estimate`, the :class:`ExactInfo`).
    """
    lin, z, ops = ctx.lin, ctx.z, ctx.ops
    B, d = z.shape
    chunk = d if options.chunk_size is None else min(options.chunk_size, d)
    # A linearization that can form A = JᵀJ without J (a decoder ending in a linear layer W
    # narrower than D: A = Mᵀ(WᵀW)M) returns it from gram(); the surrogate is then
    # tr(stopgrad(A⁻¹) A), whose gradient is tr(A⁻¹ ∂A) = ∂ log det A.
    gram = getattr(lin, "gram", None)
    # A chunked call keeps the tangent path (its memory bound is what chunk_size asks for).
    factored = callable(gram) and options.chunk_size is None
    A_graph = gram(create_graph=ctx.need_grad) if factored else None
    if A_graph is not None:
        out_dtype = check_lin_output(lin, z, ctx.autocast)
        L, value, jitter, singular, failed = _factor(
            ops,
            A_graph.detach().to(ctx.linalg_dtype),
            ctx.on_singular,
            ctx.precision(out_dtype),
        )
        info = ExactInfo(gram="factored", jitter=jitter, chunk_size=d)
        S = None
        if ctx.need_grad:
            S = (_inverse_gram(ops, L, failed, A_graph.dtype) * A_graph).sum((1, 2))
        return Estimate(value, S, singular), info
    basis = torch.eye(d, dtype=z.dtype, device=z.device).expand(B, d, d)  # row k is e_k
    starts = range(0, d, chunk)
    if ctx.need_grad and chunk == d:
        JT = lin.jvp(basis, create_graph=True)  # (B, d, D): JT[:, k] = J e_k
    else:
        JT = torch.cat([lin.jvp(basis[:, s : s + chunk]) for s in starts], dim=1)
    precision = ctx.precision(check_lin_output(lin, z, ctx.autocast), JT.dtype)
    L, value, jitter, singular, failed = _factor(
        ops, _gram(ops, JT.detach(), ctx.linalg_dtype), ctx.on_singular, precision
    )
    info = ExactInfo(gram="tangents", jitter=jitter, chunk_size=chunk)
    if not ctx.need_grad:
        return Estimate(value, None, singular), info
    # Rows of A⁻¹Jᵀ are the columns of J A⁻¹ (A symmetric), the detached half of S. A d×d
    # inverse then one GEMM in the model's dtype is ~2.5x cheaper than a (d, D) triangular solve
    # (in float32 for a 16-bit J, rounded once to its dtype).
    acc = accumulate_dtype(JT.dtype)
    inv_A_JT = _solve_rows(_inverse_gram(ops, L, failed, acc), JT.detach())
    if chunk == d:
        S = 2.0 * (inv_A_JT * JT).sum((1, 2), dtype=acc)
    else:
        # Each chunk's graph is rebuilt inside backward: peak memory scales with chunk_size.
        S = 2.0 * sum(
            checkpoint(
                tangent_inner,
                lin,
                basis[:, s : s + chunk],
                inv_A_JT[:, s : s + chunk],
                use_reentrant=False,
            )
            for s in starts
        )
    return Estimate(value, S, singular), info
