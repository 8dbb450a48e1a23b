"""Tiny helpers shared across layers."""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path


def mix_seed(*xs: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 rounds): seeds per item / step / rank."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (``.<name>.<random>.tmp``); on success it replaces
    ``path`` atomically (and the rename is fsynced), on any error it is removed, so ``path`` is never
    half-written or lost. A process killed in between leaves the temporary file:
    :func:`orphaned_temps` finds it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_path` (fsynced): the old file or the new one,
    never an empty or half-written one. Raises the ``OSError`` of a failed write."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


_TEMP = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}\.tmp$")


def orphaned_temps(folder: str | os.PathLike) -> list[Path]:
    """The temporary files :func:`atomic_path` left in ``folder`` (a process killed mid-write)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _TEMP.match(p.name))
