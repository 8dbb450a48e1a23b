"""Shared helpers for parity tests.

Every parity test is generic over a fixture directory: ``VISREP_PARITY_DIR`` (default
``tests/fixtures/parity``). A fixture is a pair ``<name>.safetensors`` + ``<name>.json``; the JSON
``kind`` field says which test reads it, and its ``tolerance`` block gives atol/rtol per key (a
``default`` plus glob overrides such as ``out.grad.*``). A new fixture of a known kind needs no new code.

Integrity (checked by ``tests/conftest.py`` in every session that collects parity tests):
:func:`parity_dir_problems` lists sidecars that do not parse, lack ``kind`` or a ``tensors`` block naming
exactly the stored keys, or files without their partner; every :class:`Fixture` loaded while a test runs
is recorded, and a whole-directory run fails on the fixtures no test loaded (:func:`unconsumed_fixtures`).
A missing directory or a kind with no fixture is a skip locally and a failure under ``CI=true``.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

DEFAULT_PARITY_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
PARITY_DIR = Path(os.environ.get("VISREP_PARITY_DIR", DEFAULT_PARITY_DIR))

# Resolved paths of the sidecars loaded through Fixture while a test ran (PYTEST_CURRENT_TEST is set
# during a test's setup / call / teardown, not during collection). See consumed_fixtures().
_CONSUMED: set[str] = set()


class Fixture:
    def __init__(self, json_path: Path):
        self.name = json_path.stem
        self.meta = json.loads(json_path.read_text())
        self.kind = self.meta["kind"]
        self.config = self.meta.get("config", {})
        self.tensors = load_file(str(json_path.with_suffix(".safetensors")))
        if os.environ.get("PYTEST_CURRENT_TEST"):
            _CONSUMED.add(str(Path(json_path).resolve()))

    def __repr__(self):
        return f"Fixture({self.name})"

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose key starts with ``prefix``, with the prefix stripped."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def listed(self, name: str) -> list[torch.Tensor]:
        """A python list stored element-wise as ``name.0``, ``name.1``, ..."""
        out, i = [], 0
        while f"{name}.{i}" in self.tensors:
            out.append(self.tensors[f"{name}.{i}"])
            i += 1
        return out

    def tolerance(self, key: str) -> tuple[float, float]:
        tol = self.meta.get("tolerance", {})
        best = tol.get("default", {})
        for pattern, value in tol.items():
            if pattern in ("default", "note") or not isinstance(value, dict):
                continue
            if fnmatch.fnmatch(key, pattern):
                best = value
        if not isinstance(best, dict) or "atol" not in best:
            return 1e-9, 1e-9
        return float(best["atol"]), float(best.get("rtol", 0.0))

    def assert_close(self, key: str, actual: torch.Tensor, expected: torch.Tensor | None = None):
        expected = self.tensors[key] if expected is None else expected
        atol, rtol = self.tolerance(key)
        assert actual.shape == expected.shape, \
            f"{self.name}:{key}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{self.name}:{key}: {m}")


def unavailable(reason: str):
    """One pytest param standing for "nothing to test": a skip locally, a failure under ``CI=true``
    (the ``unavailable`` marker of tests/conftest.py)."""
    return pytest.param(None, marks=[pytest.mark.unavailable(reason)], id="unavailable")


def fixtures_of_kind(*kinds: str) -> list:
    """pytest params for every fixture of the given kind(s) in the parity directory."""
    if not PARITY_DIR.is_dir():
        return [unavailable(f"no parity dir {PARITY_DIR}")]
    paths = []
    for p in sorted(PARITY_DIR.glob("*.json")):
        try:
            kind = json.loads(p.read_text()).get("kind")
        except (OSError, json.JSONDecodeError):
            continue
        if kind in kinds and p.with_suffix(".safetensors").exists():
            paths.append(p)
    if not paths:
        if PARITY_DIR.resolve() != DEFAULT_PARITY_DIR.resolve():  # another set (e.g. held-back fixtures) may
            # hold only some kinds: a kind it lacks is not tested here, which is no failure of this set
            return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fixtures of kind {kinds} in "
                                                                   f"VISREP_PARITY_DIR={PARITY_DIR}"),
                                 id="none")]
        return [unavailable(f"no fixtures of kind {kinds} in {PARITY_DIR}")]
    return [pytest.param(p, id=p.stem) for p in paths]


def load_fixture(path: Path) -> Fixture:
    return Fixture(path)


# ----------------------------------------------------------------------------------- integrity
def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def fixture_problems(json_path: Path) -> list[str]:
    """What is wrong with one fixture pair (empty when nothing): the sidecar parses to an object with a
    string ``kind`` and a ``tensors`` block whose keys are exactly the stored keys (shapes, where given,
    equal to the stored shapes), and its ``.safetensors`` exists and loads."""
    name = json_path.name
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return [f"{name}: sidecar does not parse ({type(e).__name__}: {e})"]
    if not isinstance(meta, dict):
        return [f"{name}: sidecar is a {type(meta).__name__}, not an object"]
    problems = []
    if not isinstance(meta.get("kind"), str) or not meta["kind"]:
        problems.append(f"{name}: no 'kind'")
    listed = meta.get("tensors")
    if not isinstance(listed, dict) or not listed:
        problems.append(f"{name}: no 'tensors' block (every stored key with shape, dtype, meaning)")
        listed = None
    st = json_path.with_suffix(".safetensors")
    if not st.is_file():
        return problems + [f"{name}: {st.name} is missing"]
    try:
        stored = _safetensors_shapes(st)
    except Exception as e:  # a truncated or foreign file
        return problems + [f"{st.name}: does not load ({type(e).__name__}: {e})"]
    if listed is not None:
        extra, absent = sorted(set(listed) - set(stored)), sorted(set(stored) - set(listed))
        if extra:
            problems.append(f"{name}: 'tensors' lists keys not in {st.name}: {', '.join(extra[:8])}"
                            + (f" (+{len(extra) - 8})" if len(extra) > 8 else ""))
        if absent:
            problems.append(f"{name}: 'tensors' does not list stored keys: {', '.join(absent[:8])}"
                            + (f" (+{len(absent) - 8})" if len(absent) > 8 else ""))
        for key in sorted(set(listed) & set(stored)):
            entry = listed[key]
            if isinstance(entry, dict) and "shape" in entry and list(entry["shape"]) != stored[key]:
                problems.append(f"{name}: tensors[{key!r}].shape {entry['shape']} != stored {stored[key]}")
    return problems


def parity_dir_problems(directory: Path | None = None) -> list[str]:
    """Every integrity problem of the fixture directory (empty when none); see :func:`fixture_problems`.
    A ``.safetensors`` without its sidecar is one too; other files (README.md, ...) are ignored."""
    directory = PARITY_DIR if directory is None else Path(directory)
    problems = []
    for st in sorted(directory.glob("*.safetensors")):
        if not st.with_suffix(".json").is_file():
            problems.append(f"{st.name}: no sidecar {st.with_suffix('.json').name}")
    for js in sorted(directory.glob("*.json")):
        problems += fixture_problems(js)
    return problems


def consumed_fixtures() -> set[Path]:
    """Sidecars loaded through :class:`Fixture` while a test ran, by every copy of this module (it is
    imported both as ``parity_helpers`` and as ``parity.parity_helpers``)."""
    here = Path(__file__).resolve()
    out: set[str] = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and f.endswith("parity_helpers.py") and Path(f).resolve() == here:
            out |= getattr(mod, "_CONSUMED", set())
    return {Path(p) for p in out}


def unconsumed_fixtures(directory: Path | None = None) -> list[str]:
    """Names of the fixtures in the directory that no test loaded in this session."""
    directory = PARITY_DIR if directory is None else Path(directory)
    used = consumed_fixtures()
    return [js.stem for js in sorted(directory.glob("*.json")) if js.resolve() not in used]
