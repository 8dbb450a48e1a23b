"""Run the learning tests (``pytest -m slow``), each in an interpreter of its own, in parallel lanes.

``./dev test`` calls this after the fast tier. Each learning run gets a fresh process: in one long
process the oneDNN patch-embedding backward became ~150x slower after earlier tests (0.35 s -> 50 s a
step), never alone. With ``--lanes N`` (default: the number of CPU cores, at most 4) N runs go at once,
each on one thread (``VISREP_LEARNING_THREADS=1``: on a small CPU two one-thread runs finish sooner
than two two-thread runs one after the other). The longest runs start first: a run's expected length
is its ``@pytest.mark.timeout`` (every learning test sets it to about 3x its measured time). Each
run's output is printed whole when it ends; the exit status is 0 only when every run passed.

    python tests/run_learning.py [--lanes N] [pytest args for every run, e.g. -k msn]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _Collect:
    """A pytest plugin that records each collected item's node id and timeout mark."""

    def __init__(self):
        self.items: list[tuple[str, float]] = []

    def pytest_collection_finish(self, session):  # after -m / -k deselection
        for item in session.items:
            mark = item.get_closest_marker("timeout")
            self.items.append((item.nodeid, float(mark.args[0]) if mark and mark.args else 300.0))


def collect(extra: list[str]) -> list[tuple[str, float]]:
    plugin = _Collect()
    with open(os.devnull, "w") as null:
        stdout, sys.stdout = sys.stdout, null
        try:
            rc = pytest.main(["-q", "-m", "slow", "--collect-only", "-p", "no:cacheprovider", *extra],
                             plugins=[plugin])
        finally:
            sys.stdout = stdout
    if rc not in (0, 5):  # 5: nothing collected
        raise SystemExit(f"[learning] collecting the learning tests failed (pytest exit {rc})")
    return plugin.items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lanes", type=int, default=min(4, len(os.sched_getaffinity(0))))
    args, extra = ap.parse_known_args(argv)
    os.chdir(ROOT)
    todo = sorted(collect(extra), key=lambda item: -item[1])  # longest first
    lanes = max(1, args.lanes)
    env = dict(os.environ)
    if lanes > 1:
        env.setdefault("VISREP_LEARNING_THREADS", "1")
    print(f"[learning] {len(todo)} learning runs, {lanes} at a time, "
          f"{env.get('VISREP_LEARNING_THREADS', 'all cores')} thread(s) each", flush=True)
    running: list[tuple[str, subprocess.Popen, object, float]] = []
    failed: list[str] = []
    t_all = time.perf_counter()
    while todo or running:
        while todo and len(running) < lanes:
            node, _ = todo.pop(0)
            log = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", node,
                                     *extra], stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((node, proc, log, time.perf_counter()))
        time.sleep(0.5)
        for entry in [r for r in running if r[1].poll() is not None]:
            running.remove(entry)
            node, proc, log, t0 = entry
            log.seek(0)
            ok = proc.returncode == 0
            print(f"\n[learning] {'PASSED' if ok else 'FAILED'} {node} ({time.perf_counter() - t0:.0f} s)\n"
                  f"{log.read().rstrip()}", flush=True)
            log.close()
            if not ok:
                failed.append(node)
    print(f"\n[learning] {len(failed)} failed; all learning runs took {time.perf_counter() - t_all:.0f} s"
          + "".join(f"\n  FAILED {n}" for n in failed), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
