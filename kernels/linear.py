"""Linear layer with a diagonal scale, for many tangents at once: ``scaled_linear``.

Forward tangents  Y = (X Wᵀ) ⊙ S   (the tangent map of Linear followed by an activation σ,
S = σ'(a));  cotangents  X̄ = (Ȳ ⊙ S) W  (its transpose). One kernel serves both directions:
the constexpr ``TRANSPOSE`` moves the scale from the epilogue (on the GEMM's output) to the
prologue (on its input) and the launcher passes W's strides swapped. S has one row per sample
and is broadcast over the K tangents of that sample.

Two call-time switches (:mod:`rnf_fast.kernels.tuning`), both off by default: the ``tl.dot``
input precision (``RNF_FAST_TRITON_PRECISION``: ``ieee``, or ``tf32x3`` on tensor cores) and
tile autotuning over :data:`AUTOTUNE_CONFIGS` (``RNF_FAST_TRITON_AUTOTUNE=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tuning import autotune_enabled, input_precision, tuned

__all__ = ["AUTOTUNE_CONFIGS", "BLOCK_SEG", "DEFAULT_CONFIGS", "scaled_linear"]

BLOCK_SEG = 128  # reduction segment summed on its own, then added to the total (an accuracy
# choice, fixed in every configuration: a multiple of each BLOCK_R)
# (BLOCK_M rows of B·K tangents, BLOCK_N outputs, BLOCK_R reduction chunk, num_warps) per
# program. tl.dot needs every block >= 16 on a GPU. The default takes the first BLOCK_N >= N,
# else the last: 32 for narrow layers (d -> 16). 8 warps: at 4 the two-level sum of the 64-wide
# tile spills registers (ptxas, sm_90).
DEFAULT_CONFIGS = ((64, 32, 32, 8), (64, 64, 32, 8))
# What RNF_FAST_TRITON_AUTOTUNE=1 times, per input precision (the defaults among them, so tuning
# never loses to them but for timing noise). Each compiles for sm_90 without spills in every
# variant (tests/test_triton_compile.py); larger tiles spill in the transposed, scaled variant
# (IEEE: 64 × 128 and 128 × 64 at 8 warps; tf32x3: 128 × 64), which tensor cores take only at
# BLOCK_R = 16: hence the 64 × 128 × 16 tile for tf32x3 alone.
_SMALL_TILES = ((32, 32, 16, 4), (32, 64, 16, 8), (64, 64, 16, 8))
AUTOTUNE_CONFIGS = {
    "ieee": (*DEFAULT_CONFIGS, *_SMALL_TILES),
    "tf32x3": (*DEFAULT_CONFIGS, *_SMALL_TILES, (64, 128, 16, 8)),
}


@triton.jit
def _scaled_linear_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    R,
    K,
    stride_wr,
    stride_wn,
    HAS_SCALE: tl.constexpr,
    TRANSPOSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_SEG: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # Y[m, n] = Σ_r X[m, r] W'[r, n] with W'[r, n] at w_ptr + r·stride_wr + n·stride_wn: M = B·K
    # rows (K tangents per sample), N outputs, R the reduction length, walked BLOCK_R at a time.
    # Rows m = b·K + k share the scale row S[b]: on the output (n) when not TRANSPOSE, on the
    # input (r) when TRANSPOSE.
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    red = tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < N
    sample = rows // K
    # Two-level sum over R: a running tl.dot over one segment of BLOCK_SEG, the segment sums
    # added after. One running sum over R = 784 rounded 2.4x worse than cuBLAS on an H200.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, R, BLOCK_SEG):
        seg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(s0, tl.minimum(s0 + BLOCK_SEG, R), BLOCK_R):
            rr = r0 + red
            red_ok = rr < R
            in_mask = row_ok[:, None] & red_ok[None, :]
            a = tl.load(x_ptr + rows[:, None] * R + rr[None, :], mask=in_mask, other=0.0)
            if HAS_SCALE and TRANSPOSE:
                a = a * tl.load(s_ptr + sample[:, None] * R + rr[None, :], mask=in_mask, other=0.0)
            w = tl.load(
                w_ptr + rr[:, None] * stride_wr + cols[None, :] * stride_wn,
                mask=red_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            seg = tl.dot(a, w, seg, input_precision=INPUT_PRECISION)
        acc += seg
    out_mask = row_ok[:, None] & col_ok[None, :]
    if HAS_SCALE and not TRANSPOSE:
        acc = acc * tl.load(s_ptr + sample[:, None] * N + cols[None, :], mask=out_mask, other=0.0)
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=out_mask)


def _check(X: Tensor, W: Tensor, S: Tensor | None, transpose: bool) -> tuple[int, int]:
    if X.dim() != 3:
        raise ValueError(f"X must be (B, K, n), got {tuple(X.shape)}")
    if W.dim() != 2:
        raise ValueError(f"W must be (n_out, n_in), got {tuple(W.shape)}")
    n_out, n_in = W.shape
    n_x = n_out if transpose else n_in
    if X.shape[2] != n_x:
        raise ValueError(
            f"X must be (B, K, {n_x}) for W of shape {tuple(W.shape)} and transpose={transpose}, "
            f"got {tuple(X.shape)}"
        )
    if S is not None and S.shape != (X.shape[0], n_out):
        raise ValueError(f"S must be (B, n_out) = {(X.shape[0], n_out)}, got {tuple(S.shape)}")
    for name, t in (("X", X), ("W", W), ("S", S)):
        if t is not None and (t.dtype != torch.float32 or t.device != X.device):
            raise TypeError(f"{name} must be float32 on {X.device}, got {t.dtype} on {t.device}")
    return n_x, n_in if transpose else n_out


def _default_config(N: int) -> tuple[int, int, int, int]:
    return next((c for c in DEFAULT_CONFIGS if c[1] >= N), DEFAULT_CONFIGS[-1])


def scaled_linear(
    X: Tensor,
    W: Tensor,
    S: Tensor | None,
    *,
    transpose: bool = False,
    precision: str | None = None,
    autotune: bool | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> Tensor:
    """Tangents through a linear layer and a diagonal scale, every tangent in one GEMM.

    ``transpose=False``: Y = (X Wᵀ) ⊙ S; ``transpose=True``: Y = (X ⊙ S) W. float32 in and
    out, float32 accumulation, by default with IEEE products (no TF32).

    Arguments:
        X: (B, K, n_in) tangents (``transpose=True``: (B, K, n_out) cotangents).
        W: (n_out, n_in) the layer's weight.
        S: (B, n_out) per-sample scale, broadcast over K, or None for no scale.
        transpose: apply the transposed map.
        precision: ``"ieee"`` or ``"tf32x3"`` (tensor cores); None reads
            ``RNF_FAST_TRITON_PRECISION`` (default ``"ieee"``).
        autotune: time the precision's :data:`AUTOTUNE_CONFIGS` on the first call per shape
            and keep the fastest; None reads ``RNF_FAST_TRITON_AUTOTUNE`` (default off: the
            fixed tiles).
        config: one (BLOCK_M, BLOCK_N, BLOCK_R, num_warps) of the precision's
            :data:`AUTOTUNE_CONFIGS` to launch (overrides ``autotune``).

    Returns:
        (B, K, n_out) (``transpose=True``: (B, K, n_in)).
    """
    R, N = _check(X, W, S, transpose)
    precision = input_precision(precision)
    choices = AUTOTUNE_CONFIGS[precision]
    if config is not None and config not in choices:
        raise ValueError(f"config must be one of {choices} for {precision!r}, got {config}")
    B, K = X.shape[:2]
    M = B * K
    X = X.contiguous()
    S_arg = X if S is None else S.contiguous()  # never read when HAS_SCALE is False
    Y = torch.empty(B, K, N, dtype=X.dtype, device=X.device)
    if M == 0 or N == 0:
        return Y
    stride_wr, stride_wn = (W.stride(0), W.stride(1)) if transpose else (W.stride(1), W.stride(0))

    def launch(tiles: tuple[int, int, int, int]) -> None:
        block_m, block_n, block_r, num_warps = tiles
        _scaled_linear_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            X,
            W,
            S_arg,
            Y,
            M,
            N,
            R,
            K,
            stride_wr,
            stride_wn,
            HAS_SCALE=S is not None,
            TRANSPOSE=transpose,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_R=block_r,
            BLOCK_SEG=BLOCK_SEG,
            INPUT_PRECISION=precision,
            num_warps=num_warps,
        )

    if config is None:
        config = _default_config(N)
        if autotune_enabled(autotune):
            key = ("scaled_linear", X.device, M, N, R, stride_wr, stride_wn, transpose)
            key += (S is not None, precision)
            config = tuned(key, choices, launch, X.device, config)
    launch(config)
    return Y
