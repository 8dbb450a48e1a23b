"""Checkpoints that are never half-written.

``save_checkpoint`` writes to a temporary file in the target's folder, flushes and fsyncs it, then
``os.replace``s it over the target (atomic on POSIX). If anything fails (disk full, permissions,
quota) the temporary file is removed and a :class:`CheckpointError` says what happened; the
previous checkpoint at that path is untouched.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch

from visrep.errors import CheckpointError
from visrep.utils import atomic_path


def _cause(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno == errno.ENOSPC:
            return "no space left on device"
        if e.errno == errno.EDQUOT:
            return "disk quota exceeded"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if e.errno == errno.EROFS:
            return "read-only file system"
        return os.strerror(e.errno).lower()
    return f"{type(e).__name__}: {e}"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` with ``torch.save``; returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{_cause(e)} while creating the folder for {path}") from e
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        previous = "the previous checkpoint is intact" if path.exists() else "no previous checkpoint exists there"
        raise CheckpointError(f"{_cause(e)} while writing {path}; {previous}") from e
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any ``torch.save`` dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # our checkpoints hold only tensors, numbers, strings and containers of them
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise CheckpointError(f"{_cause(e)} while reading {path}") from e
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a visrep checkpoint ({type(e).__name__}: {e}); "
            "it may be truncated"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
