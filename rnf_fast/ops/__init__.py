"""Every small numerical op of rnf_fast, and the one dispatch that picks who runs it.

``reference`` is the plain-PyTorch version of every op (the spec and the fallback on every
device): the matvec ops of the linearizations (``scaled_linear``, ``coupling_tangent``,
``coupling_cotangent``) and the engine's ops (``gram``, Cholesky, CG, Lanczos). The backends hold
only the ops they implement: ``cpp`` runs them from the compiled extension ``rnf_fast._C``,
``triton`` from the Triton kernels of :mod:`rnf_fast.kernels` (with their compile-failure
fallback). ``dispatch`` resolves the backend of a call (``backend=``, a :func:`use_backend`
block, else the fastest available for the device) and falls back per op to the reference.
Layer: above :mod:`rnf_fast.kernels` and ``rnf_fast._C``; below the linearizations and the
engine.
"""

from .dispatch import (
    Backend,
    available_backends,
    backend_report,
    coupling_cotangent,
    coupling_tangent,
    get_backend,
    scaled_linear,
    use_backend,
)

__all__ = [
    "Backend",
    "available_backends",
    "backend_report",
    "coupling_cotangent",
    "coupling_tangent",
    "get_backend",
    "scaled_linear",
    "use_backend",
]
