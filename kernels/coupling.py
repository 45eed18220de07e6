"""Coupling-layer tangents and cotangents from cached factors: ``coupling_tangent`` and
``coupling_cotangent``.

A coupling layer maps each transformed coordinate y_i = τ(x_i; θ_i) with parameters θ_i (P of
them per coordinate: P = 2 for affine, 3·bins - 1 or so for splines) produced by a conditioner.
Its linearization caches, per sample, ∂y/∂x (B, m) and ∂y/∂θ (B, m, P); then for K tangents

    tangent:    ẏ = ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p
    cotangent:  x̄ = ∂y/∂x ⊙ ȳ,  θ̄_p = ∂y/∂θ_p ⊙ ȳ

One kernel serves both (constexpr ``TRANSPOSE``); P is walked in chunks of ``BLOCK_P``, so any
P works with the same few compiled configurations.

Programs take either one (sample, tangent) row's slice of m features each, or, ``packed``, a
block of the flattened rows × m elements, so that tabular flows (m of 3-21 features in blocks
of 64-1,024 lanes) do not leave over 95% of the lanes masked. Packing is off unless asked for
(``packed=True``, or ``RNF_FAST_COUPLING_PACKED=1`` read at each call) until a GPU measurement
shows it wins (the GPU check times both).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "BLOCK_ELEMENTS",
    "BLOCK_P_CHOICES",
    "coupling_cotangent",
    "coupling_tangent",
    "packed_by_default",
]

BLOCK_P_CHOICES = (2, 8, 32)  # affine (P = 2), small splines, larger splines (loops past 32)
BLOCK_ELEMENTS = 2048  # BLOCK_M · BLOCK_P per program


@triton.jit
def _coupling_kernel(
    t_ptr,
    th_ptr,
    dx_ptr,
    dth_ptr,
    out_ptr,
    out_th_ptr,
    K,
    m,
    P,
    rows,
    TRANSPOSE: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    # Not PACKED: program (row, block), row = b·K + k one tangent of sample b, block a slice of
    # m. PACKED: program e, BLOCK_M consecutive elements of the flattened (rows × m) tangents,
    # each with its own row (and sample). Below, row and i are per lane in both cases.
    if PACKED:
        e = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row = e // m
        i = e - row * m
        i_ok = e < rows * m
    else:
        row = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        i_ok = i < m
    sample = row // K
    q = tl.arange(0, BLOCK_P)
    t = tl.load(t_ptr + row * m + i, mask=i_ok, other=0.0)
    dx = tl.load(dx_ptr + sample * m + i, mask=i_ok, other=0.0)
    out = dx * t
    for p0 in range(0, P, BLOCK_P):
        p = p0 + q
        mask = i_ok[:, None] & (p < P)[None, :]
        dth = tl.load(dth_ptr + (sample * m + i)[:, None] * P + p[None, :], mask=mask, other=0.0)
        if TRANSPOSE:
            tl.store(out_th_ptr + (row * m + i)[:, None] * P + p[None, :], dth * t[:, None], mask)
        else:
            th = tl.load(th_ptr + (row * m + i)[:, None] * P + p[None, :], mask=mask, other=0.0)
            out += tl.sum(dth * th, axis=1)
    tl.store(out_ptr + row * m + i, out, mask=i_ok)


def _check(
    name: str, t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor, dtheta: Tensor | None
) -> tuple[int, int, int, int]:
    if t.dim() != 3:
        raise ValueError(f"{name} must be (B, K, m), got {tuple(t.shape)}")
    B, K, m = t.shape
    if dy_dx.shape != (B, m):
        raise ValueError(f"dy_dx must be (B, m) = {(B, m)}, got {tuple(dy_dx.shape)}")
    if dy_dtheta.dim() != 3 or dy_dtheta.shape[:2] != (B, m):
        raise ValueError(
            f"dy_dtheta must be (B, m, P) with (B, m) = {(B, m)}, got {tuple(dy_dtheta.shape)}"
        )
    P = dy_dtheta.shape[2]
    if dtheta is not None and dtheta.shape != (B, K, m, P):
        raise ValueError(f"dtheta must be (B, K, m, P) = {(B, K, m, P)}, got {tuple(dtheta.shape)}")
    named = ((name, t), ("dy_dx", dy_dx), ("dy_dtheta", dy_dtheta), ("dtheta", dtheta))
    for n, x in named:
        if x is not None and (x.dtype != torch.float32 or x.device != t.device):
            raise TypeError(f"{n} must be float32 on {t.device}, got {x.dtype} on {x.device}")
    return B, K, m, P


def packed_by_default() -> bool:
    """Whether ``RNF_FAST_COUPLING_PACKED=1`` asks for packed programs (read at each call)."""
    return os.environ.get("RNF_FAST_COUPLING_PACKED", "") == "1"


def _launch(t, th, dy_dx, dy_dtheta, out, out_th, K, m, P, transpose, packed):
    block_p = next(b for b in BLOCK_P_CHOICES if b >= min(P, BLOCK_P_CHOICES[-1]))
    block_m = BLOCK_ELEMENTS // block_p
    rows = t.shape[0] * K
    packed = packed_by_default() if packed is None else packed
    grid = (triton.cdiv(rows * m, block_m), 1) if packed else (rows, triton.cdiv(m, block_m))
    _coupling_kernel[grid](
        t,
        th,
        dy_dx,
        dy_dtheta,
        out,
        out_th,
        K,
        m,
        P,
        rows,
        TRANSPOSE=transpose,
        PACKED=packed,
        BLOCK_M=block_m,
        BLOCK_P=block_p,
        num_warps=4,
    )


def coupling_tangent(
    dx_t: Tensor,
    dtheta: Tensor,
    dy_dx: Tensor,
    dy_dtheta: Tensor,
    *,
    packed: bool | None = None,
) -> Tensor:
    """Tangents of a coupling layer's transformed half: ∂y/∂x ⊙ ẋ + Σ_p ∂y/∂θ_p ⊙ θ̇_p.

    Arguments:
        dx_t: (B, K, m) tangents of the transformed inputs x.
        dtheta: (B, K, m, P) tangents of the transform parameters θ.
        dy_dx: (B, m) cached ∂y/∂x, broadcast over K.
        dy_dtheta: (B, m, P) cached ∂y/∂θ, broadcast over K.
        packed: programs over the flattened rows (see the module docstring); None reads
            ``RNF_FAST_COUPLING_PACKED``.

    Returns:
        (B, K, m) tangents of y (float32).
    """
    B, K, m, P = _check("dx_t", dx_t, dy_dx, dy_dtheta, dtheta)
    out = torch.empty_like(dx_t, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    dx_t, dtheta = dx_t.contiguous(), dtheta.contiguous()
    dy_dx, dy_dtheta = dy_dx.contiguous(), dy_dtheta.contiguous()
    _launch(dx_t, dtheta, dy_dx, dy_dtheta, out, out, K, m, P, False, packed)
    return out


def coupling_cotangent(
    dy_t: Tensor, dy_dx: Tensor, dy_dtheta: Tensor, *, packed: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Cotangents of a coupling layer's transformed half: x̄ = ∂y/∂x ⊙ ȳ, θ̄_p = ∂y/∂θ_p ⊙ ȳ.

    Arguments:
        dy_t: (B, K, m) cotangents of y.
        dy_dx: (B, m) cached ∂y/∂x, broadcast over K.
        dy_dtheta: (B, m, P) cached ∂y/∂θ, broadcast over K.
        packed: as for :func:`coupling_tangent`.

    Returns:
        dx_t: (B, K, m) cotangents of x; dtheta: (B, K, m, P) cotangents of θ (float32).
    """
    B, K, m, P = _check("dy_t", dy_t, dy_dx, dy_dtheta, None)
    dx_t = torch.empty_like(dy_t, memory_format=torch.contiguous_format)
    dtheta = dy_t.new_empty(B, K, m, P)
    if dtheta.numel() == 0 and dx_t.numel() == 0:
        return dx_t, dtheta
    dy_t, dy_dx, dy_dtheta = dy_t.contiguous(), dy_dx.contiguous(), dy_dtheta.contiguous()
    _launch(dy_t, dy_t, dy_dx, dy_dtheta, dx_t, dtheta, K, m, P, True, packed)
    return dx_t, dtheta
