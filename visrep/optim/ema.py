"""Exponential moving average of a network's weights (EMA teachers / target encoders).

``theta_target <- m * theta_target + (1 - m) * theta_online`` over matching parameter lists, done
with two fused ``torch._foreach_*`` calls; buffers (e.g. BatchNorm statistics) are copied.

Under FSDP2 (``train.parallel=fsdp``) the online network's parameters are sharded ``DTensor``\\ s
and the target's are plain replicated tensors: each online parameter is gathered in turn with
``full_tensor()`` (an all-gather, so every process must call :func:`ema_update_` together, as the
trainer's ``after_optimizer_step`` does) and freed after its update, so the extra memory is one
parameter. A sharded target with the same sharding as the online network updates its own shard
without communication.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from visrep.distributed import full_tensor, is_dtensor


def make_target(online: nn.Module) -> nn.Module:
    """A deep copy of ``online`` whose parameters do not require gradients (the EMA target)."""
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def _matching(online: Tensor, target: Tensor) -> Tensor:
    """``online`` in the layout of ``target``: gathered when only the online tensor is sharded."""
    online = online.detach()
    return online if is_dtensor(target) else full_tensor(online)


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """In place: ``target = momentum * target + (1 - momentum) * online``; buffers copied.

    Both modules must have the same parameters in the same order (as after :func:`make_target`).
    The online parameters may be FSDP2 ``DTensor`` shards (see the module docstring).
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"ema_update_: target has {len(t_params)} parameters, online has {len(o_params)}")
    weight = 1.0 - momentum
    if any(is_dtensor(o) != is_dtensor(t) for t, o in zip(t_params, o_params)):
        for t, o in zip(t_params, o_params):  # one gathered parameter at a time
            t.lerp_(_matching(o, t), weight)
    elif t_params:  # one pass per tensor: target += (1 - momentum) * (online - target)
        torch._foreach_lerp_(t_params, [o.detach() for o in o_params], weight)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(_matching(ob, tb))


__all__ = ["ema_update_", "make_target"]
