"""The alternatives rnf_fast is measured against, and the dense truth tests compare with.

- :func:`logdet_jacrev`: what a user of plain reverse-mode autodiff writes:
  ``vmap(jacrev)`` for J (D backward passes), ``slogdet(JᵀJ)``, backward through all of it.
- :func:`logdet_jacfwd`: the strongest plain-PyTorch exact path: ``vmap(jacfwd)`` (d tangents),
  ``slogdet(JᵀJ)``, backward.
- :func:`dense_logdet`: the float64 truth (one forward-mode column at a time, ``slogdet``).

Each returns log det(JᵀJ) per sample, differentiable end to end.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacfwd, jacrev, vmap

__all__ = ["dense_jacobian", "dense_logdet", "logdet_jacfwd", "logdet_jacrev"]


def _per_row(decoder: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda zi: decoder(zi.unsqueeze(0)).squeeze(0)


def _slogdet_gram(J: Tensor) -> Tensor:
    return torch.linalg.slogdet(J.transpose(-1, -2) @ J)[1]


def logdet_jacrev(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """log det(JᵀJ) per sample with J from reverse mode (``vmap(jacrev)``).

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d).

    Returns:
        (B,) differentiable log dets.
    """
    return _slogdet_gram(vmap(jacrev(_per_row(decoder)))(z))


def logdet_jacfwd(decoder: Callable[[Tensor], Tensor], z: Tensor) -> Tensor:
    """log det(JᵀJ) per sample with J from forward mode (``vmap(jacfwd)``).

    Arguments:
        decoder: callable mapping (B, d) to (B, D).
        z: (B, d).

    Returns:
        (B,) differentiable log dets.
    """
    return _slogdet_gram(vmap(jacfwd(_per_row(decoder)))(z))


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
    return _slogdet_gram(dense_jacobian(decoder, z))
