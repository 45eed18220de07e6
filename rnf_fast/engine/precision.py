"""The precision rule of a log-det call, for float64 to bfloat16 decoders and under autocast.

- **The decoder's products** (the primal, J v, Jᵀ w, Jᵀ J v) run as the caller runs the decoder:
  in its dtype (bf16 for ``decoder.to(torch.bfloat16)``), under the caller's ``torch.autocast``
  when one is active (so a float32 decoder's GEMMs run in bf16 there, as in its forward).
  :class:`CallerAutocast` captures the caller's state and re-enters it around each product.
- **What the engine computes from them** runs with autocast switched off
  (:func:`engine_region`) and never in 16 bits: A = JᵀJ, its Cholesky factor, the CG state, the
  Lanczos quadrature and the preconditioner in the linalg dtype (float64 by default below
  float64, float32 on request; a 16-bit ``linalg_dtype`` is refused), A⁻¹Jᵀ and the surrogate's
  sums in :func:`accumulate_dtype` (float32 at least). 16-bit tangents are cast up block by block
  before any reduction; CG directions enter 16-bit products at unit max-norm and are scaled
  back, so fp16's range (smallest normal 6e-5) does not truncate CG's late, small directions.
- **The value** is returned in :func:`accumulate_dtype` of z's dtype: float32 for a bf16 or fp16
  z (bf16 would round a log det of 300 to a multiple of 2), z's dtype otherwise. Gradients reach
  z and the parameters in their own dtypes.
- **Singular samples** are judged at the precision of the products: the least precise of z's
  dtype, the output's and the caller's autocast dtype (:func:`lowest_precision`), so bf16 under
  a bf16 autocast even where z and the output are float32; 16-bit products have their own
  floors (:data:`~rnf_fast.engine.checks.SINGULAR_C_16BIT`).

The error is then that of J's rounding: per sample within 2γ u κ_F(J) of the float64 truth (u
the unit roundoff, γ the 16-bit roundings on a tangent's path, κ_F(J) = ‖J‖_F ‖J⁺‖_F), and the
gradient's relative error likewise (``tests/test_mixed_precision.py`` derives and tests it).

Autocast does not touch float64 tensors (they are not eligible), so the default float64 linear
algebra was already out of its reach; the switch matters for float32 (``linalg_dtype=float32``,
the exact path's A⁻¹Jᵀ product, the factored Gram of ``SequentialLinearization.gram``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CallerAutocast",
    "accumulate_dtype",
    "engine_region",
    "lowest_precision",
]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the engine sums tangents in: float32 for a 16-bit ``dtype``, else ``dtype``.

    Example:
        >>> accumulate_dtype(torch.bfloat16), accumulate_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32)


def lowest_precision(*dtypes: torch.dtype | None) -> torch.dtype:
    """The least precise of ``dtypes`` (the largest eps; None entries skipped).

    Example:
        >>> lowest_precision(torch.float32, None, torch.bfloat16)
        torch.bfloat16
    """
    given = [d for d in dtypes if d is not None]
    return max(given, key=lambda d: torch.finfo(d).eps)


@contextlib.contextmanager
def engine_region(device_type: str) -> Iterator[None]:
    """Autocast switched off on ``device_type`` for the block: the engine's own arithmetic."""
    if not torch.amp.is_autocast_available(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield


@dataclass(frozen=True)
class CallerAutocast:
    """The caller's autocast state on one device type, captured when the call starts, so the
    decoder's products can run under it inside the engine's autocast-free region.

    Attributes:
        device_type: the device type of z.
        dtype: the autocast dtype when autocast was enabled there, else None.
        cache: autocast's weight-cast cache setting.
    """

    device_type: str
    dtype: torch.dtype | None
    cache: bool = True

    @classmethod
    def capture(cls, device_type: str) -> CallerAutocast:
        """The autocast state of ``device_type`` now."""
        if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(
            device_type
        ):
            return cls(device_type, None)
        return cls(
            device_type,
            torch.get_autocast_dtype(device_type),
            torch.is_autocast_cache_enabled(),
        )

    def applies_to(self, dtype: torch.dtype) -> torch.dtype | None:
        """The autocast dtype that the products of a decoder in ``dtype`` carry: None without
        autocast or for float64 (autocast leaves float64 tensors alone)."""
        return None if dtype == torch.float64 else self.dtype

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """The caller's autocast re-entered (nothing when it was off)."""
        if self.dtype is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache):
            yield

    def wrap(self, lin: object) -> object:
        """``lin`` with its products run under the caller's autocast; ``lin`` itself when
        autocast was off (no wrapper, no cost)."""
        return lin if self.dtype is None else _UnderCallerAutocast(lin, self)


_PRODUCTS = ("jvp", "vjp", "gram_mv", "gram", "gram_mv_hidden", "jvp_hidden", "lift")


class _UnderCallerAutocast:
    """A linearization whose products (``jvp``, ``vjp``, ``gram_mv`` and the optional ``gram``,
    ``gram_mv_hidden``, ``jvp_hidden``, ``lift``) and output run under the caller's autocast;
    every other attribute is the wrapped linearization's."""

    def __init__(self, lin: object, caller: CallerAutocast) -> None:
        self._lin = lin
        self._caller = caller

    @property
    def out(self) -> Tensor:
        # A generic linearization runs the decoder on first access.
        with self._caller.active():
            return self._lin.out

    def __getattr__(self, name: str) -> object:
        attr = getattr(self._lin, name)
        if name not in _PRODUCTS or not callable(attr):
            return attr
        return self._under_caller(attr)

    def _under_caller(self, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            with self._caller.active():
                return fn(*args, **kwargs)

        return call
