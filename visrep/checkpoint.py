"""Checkpoints that are never half-written.

``save_checkpoint`` writes to a temporary file in the target's folder, flushes and fsyncs it, then
``os.replace``s it over the target (atomic on POSIX). If anything fails (disk full, permissions,
quota, a file-size limit) the temporary file is removed and a :class:`CheckpointError` says what
happened in one line (torch's zip writer reports a short write as ``unexpected pos``: the file
object is wrapped so that the operating system's own error is reported instead); the previous
checkpoint at that path is untouched.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from visrep.errors import CheckpointError, os_cause
from visrep.utils import atomic_path


class _Writer:
    """A binary file whose short writes are retried and whose ``OSError`` is remembered (torch's zip
    writer turns a failed write into ``RuntimeError: unexpected pos``)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        view, done = memoryview(data).cast("B"), 0
        try:
            while done < len(view):
                n = self.f.write(view[done:])
                if not n:
                    raise OSError(28, os.strerror(28))  # a write of nothing: the disk is full
                done += n
        except OSError as e:
            self.error = e
            raise
        return done

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def _cause(e: BaseException, writer: _Writer | None = None, folder: Path | None = None) -> str:
    if writer is not None and writer.error is not None:
        return os_cause(writer.error)
    if not isinstance(e, OSError) and folder is not None:
        try:
            if shutil.disk_usage(folder).free < (1 << 20):
                return f"no space left on device ({type(e).__name__}: {e})"
        except OSError:
            pass
    return os_cause(e)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` with ``torch.save``; returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{os_cause(e)} while creating the folder for {path}") from e
    writer = None
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            writer = _Writer(f)
            torch.save(state, writer)
            writer.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and (writer is None or writer.error is None) and "pos" not in str(e):
            raise  # not a write failure
        previous = ("the previous checkpoint is intact" if path.exists()
                    else "no previous checkpoint exists there")
        raise CheckpointError(f"{_cause(e, writer, path.parent)} while writing {path}; nothing was written, "
                              f"{previous}") from e
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
        raise CheckpointError(f"{os_cause(e)} while reading {path}") from e
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a visrep checkpoint ({type(e).__name__}: {e}); "
            "it may be truncated"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, expected a dict")
    return state


__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]
