"""Whether a checkpoint can continue this run: the settings that change what is trained must match."""
from __future__ import annotations

from typing import Any


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (its configuration differs in a way that matters)."""


# data.num_workers / pin_memory / root / download do not change what is trained
RESUME_IGNORED = {"data.num_workers", "data.pin_memory", "data.root", "data.download"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting that changes the run (method, model, data, optim
    sections, train.batch_size, train.seed)."""
    def keep(k: str) -> bool:
        return ((k.split(".")[0] in ("method", "model", "data", "optim") or k in ("train.batch_size", "train.seed"))
                and k not in RESUME_IGNORED)

    a = {k: v for k, v in _flat(saved).items() if keep(k)}
    b = {k: v for k, v in _flat(current).items() if keep(k)}
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def check_resumable(path, state: dict, current_cfg: dict, world: int, batch_size: int, fmt: int) -> None:
    """Raise :class:`ResumeError` listing every difference that stops ``state`` continuing this run."""
    if state.get("format") != fmt:
        raise ResumeError(f"cannot resume from {path}: not a visrep training checkpoint (format "
                          f"{state.get('format')!r}, expected {fmt})")
    diffs = config_differences(state["config"], current_cfg)
    if state["world_size"] * state["config"]["train"]["batch_size"] != world * batch_size:
        diffs.append(f"global batch: {state['world_size']} x {state['config']['train']['batch_size']} -> "
                     f"{world} x {batch_size}")
    if diffs:
        raise ResumeError(f"cannot resume from {path}: the run it holds was configured differently:\n  "
                          + "\n  ".join(diffs)
                          + "\nstart a new run (another train.out_dir) or resume with the original settings")


__all__ = ["RESUME_IGNORED", "ResumeError", "check_resumable", "config_differences"]
