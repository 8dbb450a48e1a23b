"""Whether a checkpoint can continue this run: the settings that change what is trained must match.

What may differ on resume: ``data.num_workers / pin_memory / root / download`` (how data is read),
``train.*`` except ``batch_size`` and ``seed`` (run length, logging, checkpoints, device), and the
optimisation settings of :data:`RESUME_MAY_CHANGE` (learning rates, weight decay, warm-up, betas,
momentum, eps, clipping, schedule horizon): they change no tensor's shape, and take effect from the
resumed step on (the trainer records them in ``metrics.jsonl`` as an ``event: resume`` line). Changing
the method, the model, the data, the optimizer's name, the global batch or the seed is refused.
"""
from __future__ import annotations

from typing import Any


class ResumeError(ValueError):
    """The checkpoint cannot continue this run (its configuration differs in a way that matters)."""


# data.num_workers / pin_memory / root / download do not change what is trained
RESUME_IGNORED = {"data.num_workers", "data.pin_memory", "data.root", "data.download"}
# optimisation settings a resumed run may change (no shape depends on them); the optimizer's name,
# the critical-gradient buffer (topc, aggr) and reference_compat may not
RESUME_MAY_CHANGE = {f"optim.{k}" for k in (
    "lr", "start_lr", "final_lr", "warmup_epochs", "weight_decay", "final_weight_decay", "betas", "momentum",
    "eps", "clip_grad", "lars_eta", "ipe_scale", "schedule_offset", "lr_batch_ref", "lr_batch_scaling",
    "decay", "kappa")}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def _diff(saved: dict, current: dict, keep) -> list[str]:
    a = {k: v for k, v in _flat(saved).items() if keep(k)}
    b = {k: v for k, v in _flat(current).items() if keep(k)}
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def config_differences(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for every setting that changes the run (method, model, data, optim
    sections except :data:`RESUME_MAY_CHANGE`, train.batch_size, train.seed)."""
    def keep(k: str) -> bool:
        return ((k.split(".")[0] in ("method", "model", "data", "optim") or k in ("train.batch_size", "train.seed"))
                and k not in RESUME_IGNORED and k not in RESUME_MAY_CHANGE)

    return _diff(saved, current, keep)


def allowed_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for the settings of :data:`RESUME_MAY_CHANGE` that differ."""
    return _diff(saved, current, lambda k: k in RESUME_MAY_CHANGE)


def check_resumable(path, state: dict, current_cfg: dict, world: int, batch_size: int, fmt: int) -> list[str]:
    """Raise :class:`ResumeError` listing every difference that stops ``state`` continuing this run;
    return the allowed changes (:func:`allowed_changes`)."""
    if state.get("format") != fmt:
        raise ResumeError(f"cannot resume from {path}: not a visrep training checkpoint of this version (format "
                          f"{state.get('format')!r}, expected {fmt})")
    diffs = config_differences(state["config"], current_cfg)
    if state["world_size"] * state["config"]["train"]["batch_size"] != world * batch_size:
        diffs.append(f"global batch: {state['world_size']} x {state['config']['train']['batch_size']} -> "
                     f"{world} x {batch_size}")
    if diffs:
        raise ResumeError(f"cannot resume from {path}: the run it holds was configured differently:\n  "
                          + "\n  ".join(diffs)
                          + "\nstart a new run (another train.out_dir) or resume with the original settings "
                          f"(a resume may change {', '.join(sorted(RESUME_MAY_CHANGE))})")
    return allowed_changes(state["config"], current_cfg)


__all__ = ["RESUME_IGNORED", "RESUME_MAY_CHANGE", "ResumeError", "allowed_changes", "check_resumable",
           "config_differences"]
