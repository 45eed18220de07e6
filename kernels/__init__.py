"""Triton kernels of rnf_fast, shipped as ``rnf_fast.kernels``.

One module per kernel, read top to bottom: the Triton kernel, then its launcher (tensors in,
tensors out, arguments checked): ``linear`` (``scaled_linear``), ``coupling``
(``coupling_tangent``, ``coupling_cotangent``), ``gram`` and ``cg`` (``cg_update``). Each imports
Triton; this package imports none of them, so ``import rnf_fast.kernels`` works without Triton.
The kernels import nothing of rnf_fast: the plain-PyTorch reference of each (same name) is in
:mod:`rnf_fast.ops.reference`, and :mod:`rnf_fast.ops.triton` decides when a kernel runs and
falls back to the reference when Triton fails.
"""
