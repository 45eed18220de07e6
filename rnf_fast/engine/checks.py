"""Checks of a log-det call's inputs and outputs, and how the engine reports a problem.

Bad input is a ``ValueError``/``TypeError`` that names the argument and what was expected. A
problem of the numbers (a singular JᵀJ, an unconverged CG) is a ``RuntimeWarning`` that points at
the user's call, the first frame outside rnf_fast (and torch), wherever in the engine it arises;
or a :class:`SingularJacobianError` on request.
"""

from __future__ import annotations

import sys
import warnings
from typing import Literal

import torch
from torch import Tensor

from ..checks import check_rows
from .options import CG
from .precondition import check_preconditioner

__all__ = [
    "OnSingular",
    "SingularJacobianError",
    "check_cg_against",
    "check_decoder",
    "check_on_singular",
    "check_output",
    "check_output_shape",
    "check_z",
    "linalg_dtype_for",
    "report_singular",
    "warn_at_caller",
]

OnSingular = Literal["jitter", "raise", "nan"]


class SingularJacobianError(RuntimeError):
    """JᵀJ is not numerically positive definite for some samples (J is rank deficient)."""


def _internal(module: str) -> bool:
    return module.split(".", 1)[0] in ("rnf_fast", "torch")


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside rnf_fast and torch: the line of
    user code that called into the library (torch's frames are skipped too, because
    ``logdet_grad`` is wrapped by ``torch.compiler.disable`` and may run inside a module's
    ``__call__``)."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 1 is this function, 2 its caller
    while frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def report_singular(singular: Tensor, on_singular: OnSingular, where: str) -> None:
    """Raise or warn about samples whose JᵀJ is not numerically positive definite.

    Arguments:
        singular: (B,) bool, the samples concerned.
        on_singular: ``"raise"`` raises :class:`SingularJacobianError`; otherwise a warning.
        where: what found it, for the message.
    """
    if not bool(singular.any()):
        return
    idx = singular.nonzero().squeeze(-1).tolist()
    msg = (
        f"JᵀJ is not numerically positive definite for {len(idx)} sample(s) {idx[:10]}"
        f"{'...' if len(idx) > 10 else ''} ({where}): the decoder's Jacobian is rank deficient "
        "there"
    )
    if on_singular == "raise":
        raise SingularJacobianError(msg)
    warn_at_caller(msg + "; their log det is NaN")


def check_z(z: object) -> Tensor:
    """z must be a finite floating-point (B, d) tensor with B, d >= 1."""
    return check_rows("z", z, rows="B", what="d")


def check_decoder(decoder: object, z: Tensor) -> None:
    """The decoder is callable, and a module's parameters match z's dtype and device."""
    if not callable(decoder):
        raise TypeError(f"decoder must be callable, got {type(decoder).__name__}")
    if isinstance(decoder, torch.nn.Module):
        p = next(iter(decoder.parameters()), None)
        if p is not None and (p.dtype != z.dtype or p.device != z.device):
            raise ValueError(
                f"decoder parameters are {p.dtype} on {p.device} but z is {z.dtype} on "
                f"{z.device}; move one of them (e.g. decoder.to(z))"
            )


def check_on_singular(on_singular: object) -> None:
    if on_singular not in ("jitter", "raise", "nan"):
        raise ValueError(f"on_singular must be 'jitter', 'raise' or 'nan', got {on_singular!r}")


def linalg_dtype_for(z: Tensor, linalg_dtype: object) -> torch.dtype:
    """The dtype of JᵀJ, its factor and the CG state: the given one, else float64 for a lower
    precision z (cond(JᵀJ) = cond(J)², so a float32 Cholesky fails first), else z's dtype."""
    if linalg_dtype is not None:
        if not isinstance(linalg_dtype, torch.dtype) or not linalg_dtype.is_floating_point:
            raise ValueError(f"linalg_dtype must be a floating torch.dtype, got {linalg_dtype!r}")
        return linalg_dtype
    return torch.float64 if z.dtype in (torch.float32, torch.float16, torch.bfloat16) else z.dtype


def check_cg_against(cg: CG, z: Tensor) -> None:
    """The CG options' tensors and counts against z (B, d): probes, x0, preconditioner and the
    generator's device, and K <= d for orthogonal probes."""
    B, d = z.shape
    probes = cg.probes
    if isinstance(probes, Tensor):
        if probes.shape[0] != B or probes.shape[2] != d:
            raise ValueError(
                f"probes tensor must be (B, K, d) = ({B}, K>=1, {d}), got {tuple(probes.shape)}"
            )
        if probes.device != z.device:
            raise ValueError(f"probes are on {probes.device} but z is on {z.device}")
    elif cg.probe_kind == "orthogonal" and d < cg.K:
        raise ValueError(f"orthogonal probes need probes <= d, got probes={cg.K} and d={d}")
    if cg.generator is not None and cg.generator.device.type != z.device.type:
        raise ValueError(f"generator is on {cg.generator.device} but z is on {z.device}")
    check_preconditioner(cg.preconditioner, B, d)
    x0 = cg.x0
    if x0 is not None:
        if tuple(x0.shape) != (B, cg.K, d):
            raise ValueError(f"x0 must be (B, K, d) = ({B}, {cg.K}, {d}), got {tuple(x0.shape)}")
        if not x0.is_floating_point() or x0.device != z.device:
            raise ValueError(
                f"x0 must be floating point on {z.device}, got {x0.dtype} on {x0.device}"
            )
        if not bool(torch.isfinite(x0).all()):
            raise ValueError("x0 contains NaN or Inf")


def check_output_shape(out: Tensor, z: Tensor) -> None:
    """Shapes, dtype and device of the decoder's output: no host synchronisation."""
    B, d = z.shape
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != B:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"decoder output must be (B, D) = ({B}, D), got {shape}")
    if out.shape[1] <= d:
        raise ValueError(f"decoder must map d={d} to D > d dimensions, got D={out.shape[1]}")
    if out.dtype != z.dtype or out.device != z.device:
        raise ValueError(
            f"decoder output is {out.dtype} on {out.device} but z is {z.dtype} on {z.device}"
        )


def check_output(out: Tensor, z: Tensor) -> None:
    """:func:`check_output_shape`, and that the output is finite (a host synchronisation)."""
    B = z.shape[0]
    check_output_shape(out, z)
    if not bool(torch.isfinite(out).all()):
        bad = int((~torch.isfinite(out)).any(1).sum())
        raise ValueError(f"decoder output contains NaN or Inf in {bad} of {B} samples")
