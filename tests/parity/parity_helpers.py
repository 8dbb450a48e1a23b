"""Shared helpers for parity tests.

Every parity test is generic over a fixture directory: ``VISREP_PARITY_DIR`` (default
``tests/fixtures/parity``). A fixture is a pair ``<name>.safetensors`` + ``<name>.json``; the JSON
``kind`` field says which test reads it, and its ``tolerance`` block gives atol/rtol per key (a
``default`` plus glob overrides such as ``out.grad.*``). A new fixture of a known kind needs no new code.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PARITY_DIR = Path(os.environ.get("VISREP_PARITY_DIR", Path(__file__).resolve().parents[1] / "fixtures" / "parity"))


class Fixture:
    def __init__(self, json_path: Path):
        self.name = json_path.stem
        self.meta = json.loads(json_path.read_text())
        self.kind = self.meta["kind"]
        self.config = self.meta.get("config", {})
        self.tensors = load_file(str(json_path.with_suffix(".safetensors")))

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


def fixtures_of_kind(*kinds: str) -> list:
    """pytest params for every fixture of the given kind(s) in the parity directory."""
    if not PARITY_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no parity dir {PARITY_DIR}"))]
    paths = []
    for p in sorted(PARITY_DIR.glob("*.json")):
        try:
            kind = json.loads(p.read_text()).get("kind")
        except (OSError, json.JSONDecodeError):
            continue
        if kind in kinds and p.with_suffix(".safetensors").exists():
            paths.append(p)
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no fixtures of kind {kinds} in {PARITY_DIR}"))]
    return [pytest.param(p, id=p.stem) for p in paths]


def load_fixture(path: Path) -> Fixture:
    return Fixture(path)
