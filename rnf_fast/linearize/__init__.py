"""Decoders linearized at z: J v, Jᵀ w and Jᵀ(J v) batched over probes, with no primal
recompute.

``base`` holds the :class:`Linearization` seam and :func:`linearize`, which picks the explicit
rules of ``modules`` (``nn.Sequential`` MLPs) or ``flows`` (every flow layer of the library),
else the ``torch.func`` fallback. Layer: above :mod:`rnf_fast.flows` and the kernels' dispatch;
below the engine.
"""

from .base import FuncLinearization, Linearization, linearize
from .flows import (
    PaddedFlowLinearization,
    coupling_cotangent,
    coupling_tangent,
    linearize_flow,
    linearize_module,
)

__all__ = [
    "FuncLinearization",
    "Linearization",
    "PaddedFlowLinearization",
    "coupling_cotangent",
    "coupling_tangent",
    "linearize",
    "linearize_flow",
    "linearize_module",
]
