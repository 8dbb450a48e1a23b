"""Latent-prediction losses of the JEPA family (I-JEPA, StoP, IWM)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .precision import float32_loss


@float32_loss
def normalized_targets(h: Tensor) -> Tensor:
    """Targets are the target encoder's tokens layer-normalised over features, without affine."""
    return F.layer_norm(h, (h.size(-1),))


@float32_loss
def jepa_loss(pred: Tensor, target: Tensor, kind: str = "smooth_l1") -> Tensor:
    """Mean over all elements. ``smooth_l1`` (Huber, beta=1) is what the official code runs;
    ``l2`` (mean squared error) is what the I-JEPA paper writes.

    Batch statistics: none. Under DDP each rank's mean is averaged with the gradients, which equals
    the loss on the concatenated batch when every rank holds the same number of tokens.
    """
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "l2":
        return F.mse_loss(pred, target)
    raise ValueError(f"unknown JEPA loss {kind!r}; allowed: 'smooth_l1', 'l2'")
