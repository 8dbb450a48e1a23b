"""The errors that cross layers, in the bottom layer so that any module can raise them.

Each message names the cause and what to do: the key and its allowed values (:class:`ConfigError`),
the path (:class:`CheckpointError`, :class:`WriteError`), the run directory and its owner
(:class:`RunDirectoryError`). :func:`os_cause` words an ``OSError`` the same way everywhere.
"""
from __future__ import annotations

import errno
import os


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the allowed values."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


class WriteError(RuntimeError):
    """An output (config, log, export) could not be written: the message names the path, the cause
    and what is still intact."""


class RunDirectoryError(RuntimeError):
    """``train.out_dir`` is owned by another live run, or holds a run that a fresh start would replace."""


def os_cause(e: BaseException) -> str:
    """``no space left on device`` / ``read-only file system`` / ``permission denied`` / ... for an OSError."""
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno == errno.ENOSPC:
            return "no space left on device"
        if e.errno == errno.EDQUOT:
            return "disk quota exceeded"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if e.errno == errno.EROFS:
            return "read-only file system"
        if e.errno == errno.EFBIG:
            return "file too large (file-size limit)"
        if e.errno == errno.EISDIR:
            return "is a directory"
        return os.strerror(e.errno).lower()
    return f"{type(e).__name__}: {e}"
