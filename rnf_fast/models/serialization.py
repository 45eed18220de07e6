"""Atomic writes and checked reads of the files rnf_fast saves (models and checkpoints)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "atomic_save", "load_payload", "load_state"]


class CheckpointError(ValueError):
    """A saved model or checkpoint is unreadable, of the wrong kind, or does not fit the model."""


def atomic_save(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``torch.save(payload)`` to path atomically: a temporary file, then ``os.replace``.

    A run killed while saving leaves the previous file (or none), never a truncated one.

    Arguments:
        payload: what to save; plain containers, numbers, strings and tensors only, so that
            ``torch.load(weights_only=True)`` reads it back.
        path: destination file; its folder must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(payload, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_payload(path: str | os.PathLike, *, kind: str, version: int) -> dict[str, Any]:
    """Read a file written by :func:`atomic_save` and check that it is a ``kind`` payload.

    Arguments:
        path: the file.
        kind: the expected ``payload["format"]``.
        version: the expected ``payload["version"]``.

    Returns:
        The payload dict, tensors on the CPU.

    Raises:
        FileNotFoundError: path does not exist.
        CheckpointError: the file is truncated, corrupt, or not a ``kind`` file of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"path {str(path)!r} is not a readable {kind} file (truncated or corrupt?): {err}"
        ) from err
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != kind:
        raise CheckpointError(f"path {str(path)!r} holds {found!r}, expected a {kind!r} file")
    if payload.get("version") != version:
        raise CheckpointError(
            f"path {str(path)!r} is {kind} version {payload.get('version')!r}, "
            f"this rnf_fast reads version {version}"
        )
    return payload


def load_state(module: nn.Module, state_dict: Mapping[str, Tensor], *, what: str) -> None:
    """``module.load_state_dict(state_dict)``, raising :class:`CheckpointError` on a mismatch.

    Arguments:
        module: the module to fill.
        state_dict: the saved state.
        what: how the error message names the state, e.g. "the model in 'run/checkpoint.pt'".
    """
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{what}: does not fit this model: {err}") from err
