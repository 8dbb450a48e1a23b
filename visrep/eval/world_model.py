"""World-model quality: mean reciprocal rank (IWM, Garrido et al. 2024).

For each image, a world model is asked to predict the latents of N differently transformed versions
of it (the target encoder's tokens at the target positions, one request per transformation); the
rank of the requested version among all N by squared distance to the prediction gives a reciprocal
rank. MRR 1: the predictor follows the transformation it is told; 1/N-ish: it ignores it
(an invariant predictor). The paper ranks among 256 versions; the default here is smaller for CPUs.
"""
from __future__ import annotations

import torch
from torch import Tensor


def reciprocal_ranks(pred: Tensor, bank: Tensor) -> Tensor:
    """``pred[b, k]``: the prediction asked for version ``k`` of image ``b``; ``bank[b, j]``: the
    latents of version ``j`` (both ``[B, N, T, D]``). Returns ``[B, N]``: ``1 / rank`` of ``k`` among
    the ``j`` by mean squared distance (ties count against the requested version)."""
    if pred.shape != bank.shape or pred.dim() != 4:
        raise ValueError(f"pred and bank must both be [B, N, T, D], got {tuple(pred.shape)} and {tuple(bank.shape)}")
    d = torch.cdist(pred.flatten(2).float(), bank.flatten(2).float()).pow(2)      # [B, N (asked), N (bank)]
    true = d.diagonal(dim1=1, dim2=2).unsqueeze(-1)                               # [B, N, 1]
    others = d < true
    return 1.0 / (1 + others.sum(-1) + ((d == true).sum(-1) - 1)).float()


__all__ = ["reciprocal_ranks"]
