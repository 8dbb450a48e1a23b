"""Exponential moving average of a network's weights (EMA teachers / target encoders).

``theta_target <- m * theta_target + (1 - m) * theta_online`` over matching parameter lists, done
with two fused ``torch._foreach_*`` calls; buffers (e.g. BatchNorm statistics) are copied.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


def make_target(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` whose parameters do not require gradients (the EMA target)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: ``target = momentum * target + (1 - momentum) * online``; buffers copied.

    Both modules must have the same parameters in the same order (as after :func:`make_target`).
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update_: target has {len(t_params)} parameters, online has {len(o_params)}")
    o_params = [o.detach() for o in o_params]
    if t_params:  # one pass per tensor: target += (1 - momentum) * (online - target)
        torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)


__all__ = ["ema_update_", "make_target"]
