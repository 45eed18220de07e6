"""Rectangular flows: the model, its config, and how it is saved and loaded.

Example:
    >>> from rnf_fast.models import FlowConfig, RectangularFlow
    >>> model = RectangularFlow(FlowConfig(D=3, d=1, f_layers=2, h_layers=1))
    >>> model.decode(model.encode(model.sample(5))).shape
    torch.Size([5, 3])
"""

from .builders import ElementwiseSpline, build_f, build_h
from .config import FlowConfig
from .rectangular import LogProbTerms, RectangularFlow
from .serialization import CheckpointError, atomic_save, load_payload, load_state

__all__ = [
    "CheckpointError",
    "ElementwiseSpline",
    "FlowConfig",
    "LogProbTerms",
    "RectangularFlow",
    "atomic_save",
    "build_f",
    "build_h",
    "load_payload",
    "load_state",
]
