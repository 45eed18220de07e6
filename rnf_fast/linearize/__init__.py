"""Decoders linearized at z: J v, Jᵀ w and Jᵀ(J v) batched over probes, with no primal
recompute.

``base`` holds the :class:`Linearization` seam (a base class: ``jvp`` and ``vjp`` given,
``gram_mv`` derived, optional capabilities declared, a ``path`` for the cost model) and
:func:`linearize`, which picks a decoder's linearization. ``generic`` is the one ``torch.func``
fallback (a whole decoder, or one layer without a rule). ``pieces`` are the linear building
blocks of the explicit rules; ``modules`` the rules of networks (Linear fused with the
activation after it, convolutions, GroupNorm, the flows' conditioners) and of ``nn.Sequential``
MLP decoders; ``flows`` the rules of every flow layer and the padded-flow decoder of a
rectangular flow. Layer: above :mod:`rnf_fast.flows` and :mod:`rnf_fast.ops`; below the
engine.
"""

from .base import Batching, Linearization, Path, linearize
from .flows import (
    PaddedFlowDecoder,
    PaddedFlowLinearization,
    coupling_cotangent,
    coupling_tangent,
    linearize_flow,
)
from .generic import FuncLayer, FuncLinearization, func_fallbacks
from .modules import SequentialLinearization, linearize_module, supports_sequential

__all__ = [
    "Batching",
    "FuncLayer",
    "FuncLinearization",
    "Linearization",
    "PaddedFlowDecoder",
    "PaddedFlowLinearization",
    "Path",
    "SequentialLinearization",
    "coupling_cotangent",
    "coupling_tangent",
    "func_fallbacks",
    "linearize",
    "linearize_flow",
    "linearize_module",
    "supports_sequential",
]
