"""One owner per run directory (``train.out_dir``): a lock, fresh-run refusal, ``force``, orphans.

* :class:`RunLock`: ``out_dir/run.lock`` holds the owner's pid, host and start time. It is created
  with ``O_CREAT`` and held with an exclusive ``flock`` for the whole run, so the kernel releases it
  when the owner dies (even ``kill -9``); the next run finds the file unlocked, says that it takes a
  stale lock over, and does. Where ``flock`` is unsupported the recorded pid decides (dead on this
  host: stale). A lock recorded by another host is never taken over. Only rank 0 holds it.
* :func:`claim_run_dir`: a fresh run into a directory that holds a run (``last.pt``,
  ``config.yaml``, ``metrics.jsonl``, ``tb/``) is refused unless resumed or forced (``force``
  moves everything in it but earlier ``replaced-*`` folders into ``out_dir/replaced-<time>/``:
  nothing is deleted); temporary files left by
  a write that was killed (``.last.pt.*.tmp``) are removed.
* :class:`StopSignals`: SIGINT / SIGTERM end the run at the end of the step, saved;
  :func:`skipped_summary`: one line for the unreadable files a run skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from visrep.errors import RunDirectoryError, WriteError, os_cause
from visrep.utils import orphaned_temps

LOCK_NAME = "run.lock"
RUN_FILES = ("last.pt", "config.yaml", "metrics.jsonl", "tb")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _owner_text(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('started')}"
            + (f" ({owner['command']})" if owner.get("command") else ""))


class RunLock:
    """``out_dir/run.lock``: :meth:`acquire` or :class:`RunDirectoryError` naming the owner; :meth:`release`."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale owner replaced, if any

    def _read(self, fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        try:
            owner = json.loads(raw.decode() or "{}")
            return owner if isinstance(owner, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def acquire(self) -> RunLock:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"{os_cause(e)} while creating the run directory {self.out_dir}; nothing was written") \
                from e
        host = socket.gethostname()
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WriteError(f"{os_cause(e)} while creating the lock {self.path}; nothing was written") from e
            flocked = True
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read(fd)
                os.close(fd)
                raise RunDirectoryError(
                    f"{self.out_dir} is in use by another run ({_owner_text(owner)}); wait for it to end, stop it, "
                    "or choose another train.out_dir") from None
            except (ImportError, OSError):  # no flock here (some network file systems): the recorded pid decides
                flocked = False
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous owner removed the file between our open and our lock: try again
                os.close(fd)
                continue
            owner = self._read(fd)
            if owner:
                foreign = owner.get("host") != host
                alive = not foreign and isinstance(owner.get("pid"), int) and _pid_alive(owner["pid"])
                if foreign or (not flocked and alive):
                    os.close(fd)
                    what = "recorded by another host: it cannot be checked from here" if foreign else "still running"
                    raise RunDirectoryError(
                        f"{self.out_dir} is in use by another run ({_owner_text(owner)}; {what}); if that run has "
                        f"ended, delete {self.path}, or choose another train.out_dir")
                self.took_over = owner
                warnings.warn(f"{self.path}: taking over the stale lock of {_owner_text(owner)} (that process is "
                              "no longer running)", stacklevel=3)
            me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  "command": " ".join(sys.argv)[:300]}
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, (json.dumps(me) + "\n").encode())
                with contextlib.suppress(OSError):
                    os.fsync(fd)
            except OSError as e:
                os.close(fd)
                raise WriteError(f"{os_cause(e)} while writing the lock {self.path}; nothing was written") from e
            self.fd = fd
            return self
        raise RunDirectoryError(f"{self.path} keeps changing owner: another run is starting in {self.out_dir}")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def existing_run(out_dir: str | os.PathLike) -> list[str]:
    """The run files present in ``out_dir`` (empty: nothing a fresh run would replace)."""
    out_dir = Path(out_dir)
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def remove_orphans(out_dir: str | os.PathLike) -> list[str]:
    """Delete the temporary files that a killed write left (``.last.pt.*.tmp``, ...); returns their
    names. Only call it while holding the run's lock (a live run's temporary file is not an orphan)."""
    removed = []
    for p in orphaned_temps(out_dir):
        try:
            size = p.stat().st_size
            p.unlink()
            removed.append(f"{p.name} ({size / 2**20:.1f} MiB)")
        except OSError:
            continue
    if removed:
        warnings.warn(f"{out_dir}: removed {len(removed)} temporary file(s) left by an interrupted write: "
                      + ", ".join(removed), stacklevel=3)
    return removed


def claim_run_dir(out_dir: str | os.PathLike, *, resuming: bool, force: bool) -> Path | None:
    """Check that a run may start in ``out_dir`` (the caller holds its lock). A fresh run into a
    directory that holds a run raises :class:`RunDirectoryError`, unless ``force``: then everything
    in ``out_dir`` (but the lock and earlier ``replaced-*`` folders) moves into
    ``out_dir/replaced-<time>/``, whose path is returned."""
    out_dir = Path(out_dir)
    remove_orphans(out_dir)
    present = existing_run(out_dir)
    if resuming or not present:
        return None
    if not force:
        raise RunDirectoryError(
            f"{out_dir} already holds a run ({', '.join(present)}); continue it with --resume "
            "(train(..., resume=True)), start over with --force (moves those files into "
            f"{out_dir}/replaced-<time>/), or choose another train.out_dir")
    present = sorted(p.name for p in out_dir.iterdir() if p.name != LOCK_NAME and not p.name.startswith("replaced-"))
    aside = out_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 1
    while aside.exists():
        aside = out_dir / (time.strftime("replaced-%Y%m%d-%H%M%S") + f"-{n}")
        n += 1
    try:
        aside.mkdir()
        for name in present:
            os.replace(out_dir / name, aside / name)
    except OSError as e:
        raise WriteError(f"{os_cause(e)} while moving the previous run's files into {aside}; the files not yet "
                         "moved are where they were") from e
    warnings.warn(f"--force: the previous run's {', '.join(present)} moved to {aside} (delete it when it is no "
                  "longer needed)", stacklevel=3)
    return aside


__all__ = ["LOCK_NAME", "RUN_FILES", "RunLock", "claim_run_dir", "existing_run", "remove_orphans"]


class StopSignals:
    """SIGINT / SIGTERM set a flag (the trainer saves at the end of the step and exits); a second
    signal stops at once. Installed only in the main thread; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: the user insists
            self.__exit__()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.signum = signum
        print(f"visrep: {signal.Signals(signum).name} received: saving a checkpoint at the end of this step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def exit(self, message: str) -> None:
        """Leave as the signal asked: ``KeyboardInterrupt`` (SIGINT) or ``SystemExit(128 + signum)``."""
        print(f"visrep: {message}", file=sys.stderr, flush=True)
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt(message)
        raise SystemExit(128 + self.signum)


def skipped_summary(data, logger) -> int:
    """One line for the files the dataset skipped in this run, counted across DataLoader workers
    (:func:`visrep.data.folders.skipped_images`); returns their number."""
    from visrep.data.folders import UnreadableImageWarning, skipped_images

    found = skipped_images(data)
    if not found or logger is None:
        return len(found)
    root, paths = found.root, found.paths
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    message = f"{len(paths)} unreadable image(s) of {found.total} skipped in {root} during this run: {shown}"
    warnings.warn(message, UnreadableImageWarning, stacklevel=3)
    logger.write(message)
    return len(paths)
