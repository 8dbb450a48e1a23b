"""LARS around SGD as the PAWS reference code runs it (facebookresearch/suncet @ 731547d,
``src/lars.py`` wrapping ``src/sgd.py``).

For every parameter of a group that is not excluded (``lars_exclude`` or ``wd_exclude``: biases and
BN in PAWS), the gradient is replaced by the layer-wise trust-ratio scaled one::

    g <- (g + wd * p) * eta * ||p|| / (||g|| + wd * ||p|| + 1e-8)     (skipped if ||p|| or ||g|| is 0)

and the inner SGD then runs without weight decay for it; excluded groups keep their own weight
decay (0 for PAWS) and no scaling. The inner SGD folds the learning rate into the momentum buffer
(suncet ``sgd.py``, unlike ``torch.optim.SGD``)::

    d = g + wd * p;  buf <- momentum * buf - lr * d  (buf = -lr * d at the first step);  p <- p + buf

With a constant learning rate this equals ``torch.optim.SGD``; under a schedule the buffer keeps the
learning rates at which each past gradient was applied. ``nesterov`` is not supported (PAWS: off).
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, lr, mom = group["weight_decay"], group["lr"], group["momentum"]
            adapt = not (group.get("lars_exclude", False) or group.get("wd_exclude", False))
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad.clone()
                if adapt:
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
                    ratio = group["eta"] * p_norm / (g_norm + wd * p_norm + 1e-8)
                    ok = (p_norm > 0) & (g_norm > 0)
                    d = torch.where(ok, d * ratio, d)
                state = self.state[p]
                if mom:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.mul(-lr)
                    else:
                        buf.mul_(mom).add_(d, alpha=-lr)
                    p.add_(buf)
                else:
                    p.add_(d, alpha=-lr)
        return loss


__all__ = ["LARS"]
