"""rnf_fast: rectangular normalizing flows with a fast log det(JᵀJ) gradient engine.

The drop-in for any injective decoder g: R^d -> R^D is :func:`logdet_grad`: its value is
log det(JᵀJ) per sample and its gradient is that of log det(JᵀJ), exact (forward-mode J and
Cholesky) or stochastic (Hutchinson probes and conjugate gradients).
"""

from .engine import (
    CG,
    Exact,
    LogdetInfo,
    Roulette,
    SingularJacobianError,
    choose_method,
    logdet,
    logdet_grad,
    make_probes,
)
from .linearize import FuncLinearization, Linearization, linearize
from .ops.dispatch import available_backends, backend_report, use_backend


def __getattr__(name: str):
    # The model and trainer are re-exported lazily, so `import rnf_fast` stays as light as
    # the log-det engine it is mostly imported for.
    if name in ("RectangularFlow", "FlowConfig"):
        from . import models

        return getattr(models, name)
    if name in ("train", "TrainConfig"):
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'rnf_fast' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "CG",
    "Exact",
    "FlowConfig",
    "FuncLinearization",
    "Linearization",
    "LogdetInfo",
    "RectangularFlow",
    "Roulette",
    "SingularJacobianError",
    "TrainConfig",
    "available_backends",
    "backend_report",
    "choose_method",
    "linearize",
    "logdet",
    "logdet_grad",
    "make_probes",
    "train",
    "use_backend",
]
