"""Triton kernels of rnf_fast, shipped as ``rnf_fast.kernels``.

Triton is imported lazily, only by the kernel modules in this package; the rest of rnf_fast
never imports it. :func:`triton_available` says whether Triton can be imported here.
"""

from __future__ import annotations

import importlib.util

__all__ = ["triton_available"]


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (without importing it)."""
    return importlib.util.find_spec("triton") is not None
