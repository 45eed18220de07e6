"""Batched Gram matrices A = JᵀJ: ``gram`` (the reference is :func:`rnf_fast.ops.reference.gram`).

One program computes a (BLOCK_I × BLOCK_I) tile of one sample's A, walking D in chunks.
float32 uses ``tl.dot`` per chunk of D (IEEE products by default, ``tf32x3`` tensor-core ones
with ``RNF_FAST_TRITON_PRECISION=tf32x3``) and adds the chunk sums in float64 (a plain float32
running sum over D = 784 was 6x less accurate than cuBLAS on an H200); float64 (the engine's
default linear-algebra dtype) accumulates outer products on the FMA units, a constexpr switch of
the same kernel. J may be any strided view (the engine passes transposed slices of Jᵀ), so no
copy is made. ``RNF_FAST_TRITON_AUTOTUNE=1`` times :data:`AUTOTUNE_CONFIGS` per shape instead of
taking the fixed tile (:mod:`rnf_fast.kernels.tuning`); both switches are off by default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tuning import autotune_enabled, input_precision, tuned

__all__ = ["AUTOTUNE_CONFIGS", "CONFIGS", "gram"]

# dtype -> ((BLOCK_I, BLOCK_D, num_warps), ...) by increasing BLOCK_I; the launcher takes the
# first BLOCK_I >= d (else the last). float32 tiles are >= 16 for tl.dot (the 64-wide one at 8
# warps: its float64 accumulator spills registers at 4); float64 tiles keep BLOCK_D · BLOCK_I²
# at 2048 values (16 registers per thread at 4 warps).
CONFIGS = {
    torch.float32: ((16, 32, 4), (32, 32, 4), (64, 32, 8)),
    torch.float64: ((16, 8, 4), (32, 2, 4)),
}
# What RNF_FAST_TRITON_AUTOTUNE=1 times, per dtype (the fixed tiles among them). float32 keeps
# BLOCK_D = 32, the chunk whose sum is rounded in float32 (an accuracy choice); float64 keeps
# BLOCK_D · BLOCK_I² at 2048-8192 values (from 4 warps up; more spill). Each compiles for sm_90
# without spills in every input precision (tests/test_triton_compile.py).
AUTOTUNE_CONFIGS = {
    torch.float32: (*CONFIGS[torch.float32], (16, 32, 2), (32, 32, 8)),
    torch.float64: (*CONFIGS[torch.float64], (16, 16, 8), (32, 4, 8), (64, 2, 8)),
}


@triton.jit
def _gram_kernel(
    j_ptr,
    a_ptr,
    D,
    d,
    stride_jb,
    stride_jD,
    stride_jd,
    USE_DOT: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    rj = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = ri < d
    j_ok = rj < d
    rD = tl.arange(0, BLOCK_D)
    base = j_ptr + b * stride_jb
    # float64 accumulator in both modes: float32 sums each chunk's BLOCK_D products in one
    # tl.dot and adds the chunk sums in float64, so a long D costs no more rounding than one chunk.
    acc = tl.zeros((BLOCK_I, BLOCK_I), dtype=tl.float64)
    for D0 in range(0, D, BLOCK_D):
        rows = D0 + rD
        rows_ok = rows < D
        Ji = tl.load(
            base + rows[:, None] * stride_jD + ri[None, :] * stride_jd,
            mask=rows_ok[:, None] & i_ok[None, :],
            other=0.0,
        )
        Jj = tl.load(
            base + rows[:, None] * stride_jD + rj[None, :] * stride_jd,
            mask=rows_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        if USE_DOT:
            acc += tl.dot(tl.trans(Ji), Jj, input_precision=INPUT_PRECISION).to(tl.float64)
        else:
            acc += tl.sum(Ji[:, :, None] * Jj[:, None, :], axis=0)
    out = a_ptr + b * d * d + ri[:, None] * d + rj[None, :]
    tl.store(out, acc.to(a_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


def gram(
    J: Tensor,
    *,
    precision: str | None = None,
    autotune: bool | None = None,
    config: tuple[int, int, int] | None = None,
) -> Tensor:
    """Compute A = JᵀJ for every sample.

    Arguments:
        J: (B, D, d) Jacobians, float32 or float64, any strides.
        precision: float32 products, ``"ieee"`` or ``"tf32x3"`` (tensor cores); None reads
            ``RNF_FAST_TRITON_PRECISION`` (default ``"ieee"``). float64 ignores it.
        autotune: time :data:`AUTOTUNE_CONFIGS` on the first call per shape and keep the
            fastest; None reads ``RNF_FAST_TRITON_AUTOTUNE`` (default off: the fixed tiles).
        config: one (BLOCK_I, BLOCK_D, num_warps) of J's dtype in :data:`AUTOTUNE_CONFIGS`
            to launch (overrides ``autotune``).

    Returns:
        (B, d, d) Gram matrices in J's dtype (contiguous).
    """
    if J.dim() != 3:
        raise ValueError(f"J must be (B, D, d), got {tuple(J.shape)}")
    if J.dtype not in CONFIGS:
        raise TypeError(f"J must be float32 or float64, got {J.dtype}")
    use_dot = J.dtype == torch.float32
    precision = input_precision(precision)  # checked in float64 too, where no tl.dot uses it
    if not use_dot:
        precision = "ieee"  # one compiled float64 kernel whatever the switch says
    choices = AUTOTUNE_CONFIGS[J.dtype]
    if config is not None and config not in choices:
        raise ValueError(f"config must be one of {choices} for {J.dtype}, got {config}")
    B, D, d = J.shape
    A = torch.empty(B, d, d, dtype=J.dtype, device=J.device)
    if A.numel() == 0:
        return A
    if D == 0:
        return A.zero_()

    def launch(tiles: tuple[int, int, int]) -> None:
        block_i, block_d, num_warps = tiles
        blocks = triton.cdiv(d, block_i)
        _gram_kernel[(B, blocks, blocks)](
            J,
            A,
            D,
            d,
            J.stride(0),
            J.stride(1),
            J.stride(2),
            USE_DOT=use_dot,
            BLOCK_I=block_i,
            BLOCK_D=block_d,
            INPUT_PRECISION=precision,
            num_warps=num_warps,
        )

    if config is None:
        fixed = CONFIGS[J.dtype]
        config = next((c for c in fixed if c[0] >= d), fixed[-1])
        if autotune_enabled(autotune):
            key = ("gram", J.device, J.dtype, B, D, d, J.stride(), precision)
            config = tuned(key, choices, launch, J.device, config)
    launch(config)
    return A
