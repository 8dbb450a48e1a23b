"""Build the optimizer named by ``optim.name`` from a method's parameter groups.

Parameter groups are plain dicts (``{"params": [...], ...}``) as returned by
``Method.param_groups()``. Two extra keys are understood (torch keeps unknown group keys):

* ``wd_exclude=True``: weight decay is forced to 0 and never scheduled (biases, norms, tokens);
* ``lr_scale``: the group's lr is ``lr_scale`` times the scheduled lr (default 1).

The trainer rewrites ``lr`` and ``weight_decay`` of every group at every step from the schedules
(see :func:`apply_schedules`); the values given here are only the starting point.
"""
from __future__ import annotations

from typing import Any

import torch

_CRITICAL = {"sgd_c": "SGDC", "adam_c": "AdamC", "rmsprop_c": "RMSpropC"}


def _prepare_groups(param_groups: list[dict], weight_decay: float) -> list[dict]:
    groups = []
    for i, g in enumerate(param_groups):
        if "params" not in g:
            raise ValueError(f"parameter group {i} has no 'params'")
        g = dict(g)
        g["params"] = [p for p in g["params"] if p.requires_grad]
        if not g["params"]:
            continue
        g.setdefault("lr_scale", 1.0)
        g.setdefault("wd_exclude", False)
        if g["wd_exclude"]:
            g["weight_decay"] = 0.0
        else:
            g.setdefault("weight_decay", weight_decay)
        groups.append(g)
    if not groups:
        raise ValueError("no trainable parameters: every parameter group is empty or frozen")
    return groups


def _fused_ok(groups: list[dict]) -> bool:
    return all(p.is_cuda and p.is_floating_point() for g in groups for p in g["params"])


def build_optimizer(param_groups: list[dict], cfg) -> torch.optim.Optimizer:
    """``cfg`` is an :class:`~visrep.config.OptimConfig`. Names: adamw, sgd, sgd_c, adam_c, rmsprop_c.

    adamw uses the fused CUDA kernel when every parameter is on CUDA, the foreach path otherwise.
    The critical-gradient variants come from :mod:`visrep.optim.critical` (imported lazily) with
    ``topc``, ``decay``, ``kappa``, ``reference_compat`` and ``aggr`` (left to the optimizer's default
    when None). ``rmsprop_c`` gets lr/eps/weight_decay only (its momentum stays at the optimizer's
    default: ``optim.momentum`` is SGD's momentum).
    """
    groups = _prepare_groups(param_groups, cfg.weight_decay)
    name = cfg.name
    if name == "adamw":
        fused = _fused_ok(groups)
        kw: dict[str, Any] = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        kw["fused" if fused else "foreach"] = True
        return torch.optim.AdamW(groups, **kw)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=True)
    if name in _CRITICAL:
        try:
            from visrep.optim import critical
        except ImportError as e:  # pragma: no cover - depends on the tree
            raise ImportError(f"optim.name={name!r} needs visrep.optim.critical, which failed to import: {e}") from e
        cls = getattr(critical, _CRITICAL[name])
        kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, topc=cfg.topc, decay=cfg.decay, kappa=cfg.kappa,
                  reference_compat=cfg.reference_compat)
        if cfg.aggr is not None:
            kw["aggr"] = cfg.aggr
        if name == "sgd_c":
            kw["momentum"] = cfg.momentum
        elif name == "adam_c":
            kw.update(betas=tuple(cfg.betas), eps=cfg.eps)
        else:
            kw["eps"] = cfg.eps
        return cls(groups, **kw)
    raise ValueError(f"optim.name: unknown optimizer {name!r}; allowed: adamw, sgd, {', '.join(_CRITICAL)}")


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Set every group's ``lr = lr * lr_scale`` and ``weight_decay = wd`` (unless ``wd_exclude``)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if not g.get("wd_exclude", False):
            g["weight_decay"] = wd


__all__ = ["apply_schedules", "build_optimizer"]
