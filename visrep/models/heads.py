"""Projection heads. :class:`DINOHead`: the DINO / iBOT head of DINOv2 (``dinov2/layers/dino_head.py``).

``x -> MLP (Linear-GELU-...-Linear to the bottleneck) -> L2-normalise -> weight-normalised Linear
(no bias) to the prototypes``. The last layer keeps the official ``torch.nn.utils.weight_norm`` key
names (``last_layer.weight_g`` [K, 1], ``last_layer.weight_v`` [K, bottleneck]; W = g v / ||v|| per
row), so official head weights load without renaming. Init as the official code: every MLP Linear
trunc_normal(0.02), bias 0; the last layer is created after that init, so ``weight_v`` keeps PyTorch's
default Linear init and ``weight_g`` is 1 (trainable).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free ``Linear`` with weight normalisation over each output row (``weight_norm(dim=0)``)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default init
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True):
        super().__init__()
        self.arch = dict(in_dim=in_dim, out_dim=out_dim, nlayers=nlayers, hidden_dim=hidden_dim,
                         bottleneck_dim=bottleneck_dim, mlp_bias=mlp_bias)
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, bias=mlp_bias), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalised bottleneck features (eps 1e-6 in float16, else 1e-12, as the official code)."""
        x = self.mlp(x)
        return F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(self.bottleneck(x))
