"""Hutchinson probe vectors v with E[v vᵀ] = I."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["PROBE_KINDS", "make_probes"]

ProbeKind = Literal["gaussian", "rademacher", "orthogonal"]
PROBE_KINDS = ("gaussian", "rademacher", "orthogonal")


def make_probes(
    B: int,
    K: int,
    d: int,
    *,
    kind: ProbeKind = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Draw K probe vectors per sample, scaled so that E[v vᵀ] = I_d.

    Arguments:
        B, K, d: batch size, probes per sample, latent dimension.
        kind: ``"rademacher"`` (±1 entries; the default, as in :func:`rnf_fast.logdet_grad`: the
            lowest gradient variance of a single probe measured, see the README's probe
            variance tables), ``"gaussian"`` (N(0, I)) or ``"orthogonal"`` (K <= d orthonormal
            directions per sample from the QR of a Gaussian matrix, scaled by √d: lower
            variance for the same K from K = 4 on).
        generator: source of randomness, for reproducible probes.
        dtype, device: of the result.

    Returns:
        (B, K, d) probes.

    Example:
        >>> V = make_probes(2, 3, 4, generator=torch.Generator().manual_seed(0))
        >>> V.shape, bool((V.abs() == 1).all())
        (torch.Size([2, 3, 4]), True)
    """
    if kind not in PROBE_KINDS:
        raise ValueError(f"kind must be one of {PROBE_KINDS}, got {kind!r}")
    if kind == "orthogonal" and d < K:
        raise ValueError(f"orthogonal probes need K <= d, got K={K} and d={d}")
    G = torch.randn(B, d, K, generator=generator, dtype=dtype, device=device)
    if kind == "gaussian":
        return G.transpose(1, 2).contiguous()
    if kind == "rademacher":
        return torch.sign(G).transpose(1, 2).contiguous()
    Q, R = torch.linalg.qr(G)
    # Fix the sign ambiguity of QR so the frame is uniformly (Haar) distributed.
    Q = Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(1)
    return (math.sqrt(d) * Q).transpose(1, 2).contiguous()
