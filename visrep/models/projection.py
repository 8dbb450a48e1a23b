"""Projection and prediction heads of the prototype family (MSN, PAWS), with BatchNorm whose batch
statistics span every process (the official codes convert to SyncBatchNorm when distributed).

MSN (facebookresearch/msn ``src/msn_train.py:init_model``): ``fc1 Linear(d, h) - [bn1] - gelu1 -
fc2 Linear(h, h) - [bn2] - gelu2 - fc3 Linear(h, o)``. PAWS (suncet ``src/paws_train.py``):
the same with ReLU (``relu1``/``relu2``) and always BN; its optional prediction head is ``bn1
BN(o) - fc1 Linear(o, o/4) - bn2 - relu - fc2 Linear(o/4, o)``. Layer names follow the official
``nn.Sequential(OrderedDict(...))`` so state dicts load without renaming.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from visrep.distributed import all_reduce, world_in


class DistBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics are taken over the batches of every process of
    ``group`` (through the gradient-carrying ``all_reduce``): 2 processes x B equal 1 x 2B. On one
    process (or in eval mode) it is exactly ``nn.BatchNorm1d``."""

    group = None

    def forward(self, x: Tensor) -> Tensor:
        world = world_in(self.group)
        if world == 1 or not self.training:
            return super().forward(x)
        n = all_reduce(torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device), "sum", self.group)
        mean = all_reduce(x.sum(0), "sum", self.group) / n
        var = all_reduce((x - mean.detach()).pow(2).sum(0), "sum", self.group) / n
        # the variance around the detached mean has the same value; its gradient w.r.t. the mean is
        # zero in exact arithmetic (sum of deviations), so the detached form is the exact gradient
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


class ProjectionHead(nn.Sequential):
    """Three Linear layers with optional BN and a GELU (MSN) or ReLU (PAWS) between them."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, use_bn: bool = True,
                 activation: str = "gelu"):
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        act = nn.GELU if activation == "gelu" else nn.ReLU
        layers: list[tuple[str, nn.Module]] = []
        for i, (a, b) in enumerate(((in_dim, hidden_dim), (hidden_dim, hidden_dim)), start=1):
            layers.append((f"fc{i}", nn.Linear(a, b)))
            if use_bn:
                layers.append((f"bn{i}", DistBatchNorm1d(b)))
            layers.append((f"{activation}{i}", act()))
        layers.append(("fc3", nn.Linear(hidden_dim, out_dim)))
        super().__init__(OrderedDict(layers))
        self.arch = dict(in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim, use_bn=use_bn, activation=activation)

    def zero_redundant_bias_grads_(self) -> None:
        """Zero the gradients of the biases that feed a BatchNorm (``fc1``, ``fc2`` with BN): exactly
        zero in exact arithmetic (BN subtracts the batch mean), only float noise in practice, which
        Adam's normalisation would turn into updates that depend on the summation order (so 2
        processes would differ from 1). The official code leaves the noise; its effect is < lr * 1e-7."""
        if not self.arch["use_bn"]:
            return
        for name in ("fc1", "fc2"):
            g = getattr(self, name).bias.grad
            if g is not None:
                g.zero_()


class PredictionHead(nn.Sequential):
    """PAWS's prediction head ``bn1 - fc1 (o -> o/4) - bn2 - relu - fc2 (o/4 -> o)``."""

    def __init__(self, dim: int):
        super().__init__(OrderedDict([("bn1", DistBatchNorm1d(dim)), ("fc1", nn.Linear(dim, dim // 4)),
                                      ("bn2", DistBatchNorm1d(dim // 4)), ("relu", nn.ReLU()),
                                      ("fc2", nn.Linear(dim // 4, dim))]))
        self.arch = dict(dim=dim)


__all__ = ["DistBatchNorm1d", "PredictionHead", "ProjectionHead"]
