"""Where a warning of the ops layer points: the first frame outside rnf_fast/ops."""

from __future__ import annotations

import os
import sys

__all__ = ["stacklevel_outside_ops"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _in_ops(filename: str) -> bool:
    return os.path.dirname(os.path.abspath(filename)) == _HERE


def stacklevel_outside_ops() -> int:
    """The ``stacklevel`` that points a warning issued by the caller of this function at the
    first frame outside rnf_fast/ops (the user's or the linearization's call)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _in_ops(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level
