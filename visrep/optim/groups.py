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


def no_decay_bias_bn(name: str, p: Tensor) -> bool:
    """MSN's official ``init_opt``: no weight decay for names containing ``bias`` or ``bn`` and for 1-D
    tensors (PAWS's ViT backbone too; its CNNs: :func:`no_decay_paws`)."""
    return "bias" in name or "bn" in name or p.ndim == 1


def no_decay_paws(name: str, p: Tensor) -> bool:
    """PAWS's official ``init_opt``: no weight decay and no LARS adaptation for names containing ``bias``
    or ``bn`` only, so a ResNet's downsample BatchNorm (``downsample.1.weight``) is decayed and adapted."""
    return "bias" in name or "bn" in name


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


def vit_lr_decay_rate(name: str, rate: float, num_layers: int) -> float:
    """Layer-wise lr decay of a ViT parameter (BEiT / MAE / DINOv2 ``get_vit_lr_decay_rate``): tokens,
    position and patch embeddings are layer 0, block i is layer i + 1, everything after the blocks
    (final norm, head) layer ``num_layers + 1``; the scale is ``rate ** (num_layers + 1 - layer)``."""
    layer = num_layers + 1
    if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    return rate ** (num_layers + 1 - layer)


def layer_decay_groups(vit: nn.Module, rate: float, head: nn.Module | None = None, lr: float | None = None,
                       no_decay: Callable[[str, Tensor], bool] = no_decay_default) -> list[dict]:
    """Parameter groups of a ViT (``vit.blocks``) with layer-wise lr decay ``rate`` plus an optional
    ``head`` at full lr, split by weight decay; each group has ``lr_scale`` (and ``lr = lr x lr_scale``
    when ``lr`` is given, for a plain torch optimizer). A network without ``blocks`` (a ResNet) gets
    one lr throughout."""
    if not hasattr(vit, "blocks"):
        rate, depth = 1.0, 0
    else:
        depth = len(vit.blocks)
    groups: dict[tuple[float, bool], list[Tensor]] = {}
    named = [(n, p, vit_lr_decay_rate(n, rate, depth)) for n, p in vit.named_parameters()]
    if head is not None:
        named += [(f"head.{n}", p, 1.0) for n, p in head.named_parameters()]
    for name, p, scale in named:
        if p.requires_grad:
            groups.setdefault((scale, no_decay(name, p)), []).append(p)
    out = []
    for (scale, skip), params in groups.items():
        g = {"params": params, "lr_scale": scale}
        if lr is not None:
            g["lr"] = lr * scale
        if skip:
            g.update(weight_decay=0.0, wd_exclude=True)
        out.append(g)
    return out


__all__ = ["decay_groups", "layer_decay_groups", "no_decay_bias_bn", "no_decay_default", "no_decay_official_jepa",
           "no_decay_paws", "vit_lr_decay_rate"]
