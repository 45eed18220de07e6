"""The engine's small numerical ops and the backends that run them.

``reference`` is the plain-PyTorch version of every op (the spec and the fallback on every
device); ``cpp`` runs them from the compiled extension ``rnf_fast._C``; ``triton`` from the Triton
kernels of :mod:`rnf_fast.kernels`. ``dispatch`` picks the backend for a tensor. Layer: above
:mod:`rnf_fast.kernels` and ``rnf_fast._C``; below the linearizations and the engine.
"""

from .dispatch import available_backends, backend_report, get_backend, use_backend

__all__ = ["available_backends", "backend_report", "get_backend", "use_backend"]
