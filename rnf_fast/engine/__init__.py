"""The log-det engine: ``logdet_grad`` and ``logdet`` (api), the exact and stochastic estimators,
batched CG with Lanczos bookkeeping, Hutchinson probes and CG preconditioners.

Layer: above :mod:`rnf_fast.linearize` (the decoder's J v, Jᵀ w) and :mod:`rnf_fast.ops` (the
small numerical ops); below the models and training, which call :func:`logdet_grad`.
"""

from .api import LogdetInfo, SingularJacobianError, choose_method, logdet, logdet_grad
from .probes import make_probes

__all__ = [
    "LogdetInfo",
    "SingularJacobianError",
    "choose_method",
    "logdet",
    "logdet_grad",
    "make_probes",
]
