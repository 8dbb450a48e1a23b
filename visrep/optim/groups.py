"""Parameter groups and the per-group schedule keys the trainer honours.

A group is a dict ``{"params": [...], **keys}``; besides torch's own keys the trainer reads, at every
step (see :func:`visrep.optim.factory.apply_schedules`):

* ``lr_scale`` (default 1): the group's lr is ``lr_scale x`` the scheduled lr (layer-wise decay, heads);
* ``wd_scale`` (default 1): the group's weight decay is ``wd_scale x`` the scheduled one;
* ``wd_exclude`` (default False): weight decay fixed at 0 (biases, norms);
* ``freeze_until`` (default 0): lr is 0 for steps ``< freeze_until`` (DINOv2's last layer in the first
  epoch, as the official ``last_layer_lr`` schedule: the optimizer still steps, with lr 0).
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def no_decay_default(name: str, p: Tensor) -> bool:
    """Biases, norms and other 1-D tensors, tokens and learned position embeddings."""
    return p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name


def no_decay_official_jepa(name: str, p: Tensor) -> bool:
    """Official I-JEPA / MSN / StoP ``init_opt``: names containing ``bias`` and 1-D tensors only
    (so the predictor's ``mask_token`` [1, 1, d] is decayed)."""
    return "bias" in name or p.ndim == 1


def decay_groups(*modules: nn.Module, no_decay: Callable[[str, Tensor], bool] = no_decay_default,
                 **extra) -> list[dict]:
    """Two groups over ``modules``' trainable parameters: with weight decay, and ``wd_exclude``
    for those ``no_decay(name, p)`` selects. ``extra`` keys go into both groups."""
    decay, skip, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (skip if no_decay(name, p) else decay).append(p)
    groups = [dict(params=decay, **extra), dict(params=skip, weight_decay=0.0, wd_exclude=True, **extra)]
    return [g for g in groups if g["params"]]


__all__ = ["decay_groups", "no_decay_default", "no_decay_official_jepa"]
