"""The one input check of row tensors: (N, width) floating-point data, finite where it must be.

Every layer checks its tensors of rows with it (z for the engine, x for the models, training
and plotting data, distributions' inputs), so a bad input gets the same clear message wherever
it enters. It imports nothing of rnf_fast: the bottom layer, which every other layer (data
included) may use.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_rows"]


def check_rows(
    name: str,
    x: object,
    width: int | None = None,
    *,
    rows: str = "N",
    what: str | None = None,
    min_rows: int = 1,
    finite: bool = True,
) -> Tensor:
    """Check that ``x`` is a floating-point (N, width) tensor with N >= ``min_rows`` (and, with
    ``finite``, no NaN or Inf), naming the argument ``name`` in the error.

    Arguments:
        name: the argument's name in messages (``"z"``, ``"train_x"``).
        x: the value to check.
        width: the required number of columns; None: any number >= 1.
        rows: the symbol of the row count in messages (``"B"`` for a batch, ``"N"`` for data).
        what: the symbol of the width in messages (``"d"``, ``"D"``); default the width itself.
        min_rows: the least number of rows.
        finite: also require every entry finite.

    Returns:
        ``x``, checked.

    Raises:
        TypeError: not a tensor, or not floating-point. ValueError: the wrong shape, too few
        rows, or (``finite``) NaN or Inf entries, with how many rows hold them.

    Example:
        >>> check_rows("z", torch.zeros(4, 2), rows="B", what="d").shape
        torch.Size([4, 2])
        >>> check_rows("x", torch.zeros(4, 3), 2, what="D")
        Traceback (most recent call last):
        ...
        ValueError: x must be (N, D) = (N, 2) with N >= 1, got (4, 3)
    """
    what = what or ("d" if width is None else str(width))
    shape = f"({rows}, {what})"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x).__name__}")
    if width is None:
        fits, need = x.dim() == 2 and x.shape[1] >= 1, f"{rows} >= {min_rows} and {what} >= 1"
    else:
        fits, need = x.dim() == 2 and x.shape[1] == width, f"{rows} >= {min_rows}"
        if what != str(width):
            shape += f" = ({rows}, {width})"
    if not fits or x.shape[0] < min_rows:
        raise ValueError(f"{name} must be {shape} with {need}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if finite and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise ValueError(f"{name} contains NaN or Inf in {bad} of {x.shape[0]} rows")
    return x
