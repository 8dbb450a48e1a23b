"""Suite-wide settings and checks.

* Threads: one intra-op thread (on 2-core machines torch's default pool makes the many small ops of
  tiny test models far slower); learning tests (marked ``slow``: real models, real batches) get every
  core, ``VISREP_LEARNING_THREADS`` (default: all CPUs, at most 8).
* Missing data or optional packages go through ONE helper, :func:`missing`: it skips with the reason
  (and how to install it) on a developer's machine, and FAILS with the same text when ``CI=true`` --
  a suite that passes by skipping proves nothing. Tests ask for a requirement with a marker, no import
  needed: ``@pytest.mark.fashion_mnist`` (Debian's ``dataset-fashion-mnist``),
  ``@pytest.mark.requires("faiss")`` (an optional dependency; ``pytestmark = ...`` for a whole module),
  ``@pytest.mark.unavailable("reason")`` (anything else, e.g. a fixture kind with no fixture); the markers
  are declared in pyproject.toml. Code that must decide at import time calls :func:`require` /
  :func:`require_fashion_mnist` directly.
* Parity fixtures (``tests/parity``, :mod:`parity_helpers`): a session that collects parity tests also
  runs ``parity-fixtures::integrity`` first (the directory exists -- a skip locally, a failure under
  ``CI=true`` --, every sidecar parses and has ``kind`` and a ``tensors`` block listing exactly the keys
  of its ``.safetensors``, no file lacks its partner) and, when the whole ``tests/parity`` directory runs
  unfiltered (no ``-k`` / ``-m`` / node selection deselected a parity test), ``parity-fixtures::all-consumed``
  last: every fixture in the directory was loaded by some test during this session.
"""
from __future__ import annotations

import importlib
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("VISREP_TEST_THREADS", "1")))

CI = os.environ.get("CI") == "true"
TESTS_DIR = Path(__file__).resolve().parent
PARITY_TESTS_DIR = TESTS_DIR / "parity"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # = visrep.data.datasets.DEBIAN_FASHION_MNIST_DIR
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
INSTALL_FASHION_MNIST = ("install it with `./dev setup` (runs `apt-get install -y dataset-fashion-mnist`, "
                         f"which puts the IDX files in {FASHION_MNIST_DIR}/)")
INSTALL_EXTRAS = "install the test extras with `./dev setup` (pip install -e '.[test]' -c constraints.txt)"


# ------------------------------------------------------------------------- missing requirements
def missing(what: str, how: str = "") -> None:
    """Skip with ``what`` (and ``how`` to fix it) locally; fail with the same text when ``CI=true``.

    Works inside a test, a fixture, a hook and at module level (a module-level failure is a
    collection error, which fails the run too)."""
    text = f"{what}; {how}" if how else what
    if CI:
        pytest.fail(f"CI=true: a missing requirement is a failure, not a skip: {text}", pytrace=False)
    pytest.skip(text, allow_module_level=True)


def require(module: str, how: str = INSTALL_EXTRAS):
    """Import ``module`` and return it, or :func:`missing` (a skip locally, a failure under CI)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"optional dependency {module!r} cannot be imported ({type(e).__name__}: {e})", how)


def fashion_mnist_problem() -> str | None:
    """Why Debian's Fashion-MNIST is unusable here, or None when all four IDX files are present."""
    if not FASHION_MNIST_DIR.is_dir():
        return f"Fashion-MNIST not installed: {FASHION_MNIST_DIR}/ does not exist"
    absent = [f for f in FASHION_MNIST_FILES
              if not any((FASHION_MNIST_DIR / (f + gz)).is_file() for gz in (".gz", ""))]
    return f"Fashion-MNIST incomplete: {FASHION_MNIST_DIR}/ lacks {', '.join(absent)}" if absent else None


def require_fashion_mnist() -> Path:
    """Debian's Fashion-MNIST folder, or :func:`missing` (a skip locally, a failure under CI)."""
    problem = fashion_mnist_problem()
    if problem:
        missing(problem, INSTALL_FASHION_MNIST)
    return FASHION_MNIST_DIR


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires"):
        for module in mark.args:
            require(module)
    if item.get_closest_marker("fashion_mnist") is not None:
        require_fashion_mnist()
    mark = item.get_closest_marker("unavailable")
    if mark is not None:
        missing(*mark.args, **mark.kwargs)


# ------------------------------------------------------------------------------------- threads
@pytest.fixture(autouse=True)
def _learning_threads(request):
    if request.node.get_closest_marker("slow") is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("VISREP_LEARNING_THREADS", min(8, os.cpu_count() or 1))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface (for gloo process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- parity fixture checks
def _parity_helpers():
    if str(PARITY_TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(PARITY_TESTS_DIR))
    return importlib.import_module("parity_helpers")


def _in_parity(path) -> bool:
    return Path(path).resolve().is_relative_to(PARITY_TESTS_DIR)


def _covers_parity_dir(config) -> bool:
    """Did the command line ask for the whole tests/parity directory (itself or a folder above it), with
    nothing inside it left out by ``--ignore`` / ``--ignore-glob`` / ``--deselect``?"""
    if config.getoption("ignore_glob", None) or config.getoption("deselect", None):
        return False
    for ignored in config.getoption("ignore", None) or []:
        p = Path(ignored)
        p = (p if p.is_absolute() else Path(config.invocation_params.dir) / p).resolve()
        if p.is_relative_to(PARITY_TESTS_DIR) or PARITY_TESTS_DIR.is_relative_to(p):
            return False
    for arg in config.args:
        if "::" in arg:
            continue
        p = Path(arg.split("[")[0])
        p = (p if p.is_absolute() else Path(config.invocation_params.dir) / p).resolve()
        if p.is_dir() and PARITY_TESTS_DIR.is_relative_to(p):
            return True
    return False


class ParityCheck(pytest.Item):
    """A synthetic test: ``check`` returns the problems found (a list of lines) or a skip reason."""

    def __init__(self, *, check, **kwargs):
        super().__init__(**kwargs)
        self.check = check

    def runtest(self):
        problems = self.check(self)
        if problems:
            raise ParityFixtureError("\n".join(problems))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFixtureError):
            lines = str(excinfo.value).splitlines()
            return f"{len(lines)} problem line(s) in {_parity_helpers().PARITY_DIR}:\n" + "\n".join(lines)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return PARITY_TESTS_DIR / "parity_helpers.py", None, f"parity-fixtures::{self.name}"


class ParityFixtureError(AssertionError):
    pass


def _integrity(item) -> list[str]:
    ph = _parity_helpers()
    if not ph.PARITY_DIR.is_dir():
        missing(f"no parity directory {ph.PARITY_DIR} (VISREP_PARITY_DIR)",
                "check out the repository's tests/fixtures/parity or point VISREP_PARITY_DIR at a fixture folder")
    return ph.parity_dir_problems()


def _all_consumed(item) -> list[str]:
    ph = _parity_helpers()
    deselected = item.config.stash.get(_PARITY_DESELECTED, 0)
    if deselected:
        pytest.skip(f"{deselected} parity tests were deselected: not a whole-directory run")
    if not ph.PARITY_DIR.is_dir():
        pytest.skip("no parity directory (the integrity check reports it)")
    unused = ph.unconsumed_fixtures()
    if not unused:
        return []
    return [f"{len(unused)} fixture(s) in the parity directory were loaded by no test in this session "
            "(a fixture kind without a test, or a test that no longer reads it):"] + [f"  {n}" for n in unused]


_PARITY_DESELECTED = pytest.StashKey[int]()


def pytest_deselected(items):
    n = sum(1 for it in items if _in_parity(it.path))
    if n and items:
        config = items[0].config
        config.stash[_PARITY_DESELECTED] = config.stash.get(_PARITY_DESELECTED, 0) + n


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if not any(_in_parity(it.path) for it in items):
        return
    parent = next(it for it in items if _in_parity(it.path))
    while parent.parent is not None and Path(parent.path).resolve() != PARITY_TESTS_DIR:
        parent = parent.parent  # the tests/parity directory node (the session when there is none)
    items.insert(0, ParityCheck.from_parent(parent, name="integrity", check=_integrity))
    whole = _covers_parity_dir(config) and not config.stash.get(_PARITY_DESELECTED, 0)
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the controller checks the union (below)
        config.stash[_PARITY_WHOLE] = whole
    elif whole:
        items.append(ParityCheck.from_parent(parent, name="all-consumed", check=_all_consumed))


# Under pytest-xdist (``-n N``) each worker loads only the fixtures of the tests it ran, so
# ``all-consumed`` cannot be an item: every worker reports what it loaded, and the controller fails the
# session, naming the fixtures, when the union misses one.
_PARITY_WHOLE = pytest.StashKey[bool]()


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput"):
        config.workeroutput["parity_whole"] = config.stash.get(_PARITY_WHOLE, None)
        config.workeroutput["parity_consumed"] = sorted(str(p) for p in _parity_helpers().consumed_fixtures())
        return
    reports = config.stash.get(_WORKER_PARITY, None)
    if not reports or not all(r["parity_whole"] for r in reports):
        return  # no worker collected parity tests, or a worker did not run the whole directory
    ph = _parity_helpers()
    used = {p for r in reports for p in r["parity_consumed"]}
    unused = [js.stem for js in sorted(ph.PARITY_DIR.glob("*.json")) if str(js.resolve()) not in used]
    if unused:
        tr = config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"parity-fixtures::all-consumed FAILED: {len(unused)} fixture(s) in {ph.PARITY_DIR} were "
                 "loaded by no test in this session (a fixture kind without a test, or a test that no longer "
                 "reads it):"] + [f"  {n}" for n in unused]
        if tr is not None:
            tr.ensure_newline()
            tr.write_line("\n".join(lines), red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_WORKER_PARITY = pytest.StashKey[list]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    out = getattr(node, "workeroutput", None) or {}
    if "parity_consumed" in out:
        node.config.stash.setdefault(_WORKER_PARITY, []).append(out)
