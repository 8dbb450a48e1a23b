"""One training step, in the order every caller follows (the trainer, the benchmarks, the parity tests).

    out = forward_backward(method, batch, info)   # training_step -> {"loss", terms}; loss.backward()
    ... inspect out / gradients (the trainer: finite check + stop flag, its one host sync) ...
    apply_update(method, optimizer, info)         # before_optimizer_step, clip, step, zero_grad,
                                                  # after_optimizer_step (EMA, centres, queues)

The official training loops of every method in this codebase follow the same order: gradients are
complete before any per-module gradient surgery (DINOv2's last-layer cancelling, per-module
clipping), and the teacher / centre updates see the weights after the optimizer step.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from visrep.methods.base import Method, Step


def forward_backward(method: Method, batch: dict, info: Step, *, forward: Callable | None = None,
                     autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                     ) -> dict[str, Tensor]:
    """Run ``training_step`` (through ``forward``, e.g. the DDP / compiled wrapper, when given) under
    ``autocast`` and back-propagate its ``"loss"``; returns every term the step reported."""
    with autocast():
        out = (forward or method)(batch, info)
    if "loss" not in out:
        raise KeyError(f"training_step must return a dict with a 'loss' entry, got keys {sorted(out)}")
    out["loss"].backward()
    return out


def apply_update(method: Method, optimizer: torch.optim.Optimizer, info: Step, *, clip_grad: float = 0.0,
                 params: Iterable[Tensor] | None = None) -> Tensor | None:
    """The method's pre-step hook, global-norm clipping (when ``clip_grad`` > 0), the optimizer step,
    ``zero_grad`` and the method's post-step hook. Returns the gradient norm before clipping (or None)."""
    method.before_optimizer_step(info)
    norm = None
    if clip_grad:
        if params is None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    method.after_optimizer_step(info)
    return norm


def train_step(method: Method, batch: dict, info: Step, optimizer: torch.optim.Optimizer, *,
               clip_grad: float = 0.0, **forward_kwargs) -> dict[str, Tensor]:
    """:func:`forward_backward` then :func:`apply_update` (no checks in between): one whole step."""
    out = forward_backward(method, batch, info, **forward_kwargs)
    apply_update(method, optimizer, info, clip_grad=clip_grad)
    return out
