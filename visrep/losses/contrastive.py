"""Image-text contrastive losses and Llip's cross-attention mixer, as pure functions.

Conventions (open_clip / Llip): ``logit_scale`` is the *exponentiated* temperature (the models keep
its log as the parameter), image and text features are L2-normalised by the caller, and every loss
is this process's share of the global objective, so that the mean over processes (what DDP
optimises) equals the single-process loss on the concatenated batch.

Distributed behaviour is explicit: the text side (and for CLIP the image side) is gathered from
every process of ``group`` with :func:`visrep.distributed.all_gather`, whose backward sums the
gradients of every process's loss, so each process's local rows see every global negative. This
replaces the official neighbour exchange (SigLIP / Llip ring) with one all-gather: the same
per-process losses and gradients (tested against the official 4-process ring, ``llip_loss_ring_*``).

* :func:`clip_loss` -- InfoNCE in both directions (open_clip ``ClipLoss`` with ``local_loss=True,
  gather_with_grad=True``): local images against all texts and local texts against all images.
* :func:`siglip_loss` -- sigmoid loss (``-sum log sigmoid(z_ij (t <x_i, y_j> + b)) / B_local``).
* :func:`llip_mix` / :func:`llip_logits` / :func:`llip_loss` -- Llip (facebookresearch/Llip,
  ``xAttnPred`` and ``CMPLoss``): the image's K mixture tokens, as keys K and values V
  ``[B, heads, K, head_dim]``, are mixed by every caption's query Q ``[B_txt, heads, head_dim]``:
  ``zv[i, j] = concat_h(softmax_n(K[i,h,n] . Q[j,h] / weight_scale) V[i,h,n]) @ out_proj``
  (no 1/sqrt(d): ``weight_scale`` is the softmax temperature), then the SigLIP objective on
  ``logit_scale * <normalize(zv[i, j]), zt_j> + logit_bias``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from visrep import distributed as D

__all__ = ["clip_loss", "siglip_loss", "sigmoid_pair_loss", "per_token_projection", "split_heads", "llip_mix",
           "llip_logits", "llip_loss", "contrastive_similarity"]


def _targets_offset(n_local: int, group) -> int:
    """Column of this process's first positive in the gathered (rank-major) batch."""
    return D.rank_in(group) * n_local


# -- CLIP ------------------------------------------------------------------------------------------
def clip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, group=None) -> Tensor:
    """Symmetric InfoNCE on normalised features ``[B, D]`` (this process's rows; positives on the
    diagonal of the global batch). ``logit_scale``: the exponentiated temperature."""
    all_image, all_text = D.all_gather(image, group), D.all_gather(text, group)
    labels = torch.arange(image.shape[0], device=image.device) + _targets_offset(image.shape[0], group)
    per_image = logit_scale * image @ all_text.T
    per_text = logit_scale * text @ all_image.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


# -- SigLIP ----------------------------------------------------------------------------------------
def sigmoid_pair_loss(logits: Tensor, offset: int = 0) -> Tensor:
    """``-sum_ij log sigmoid(z_ij logits_ij) / B_rows`` with z = +1 at (i, offset + i), -1 elsewhere
    (SigLIP / Llip ``CMPLoss``: every pair counts, normalised by the local batch)."""
    n = logits.shape[0]
    signs = -torch.ones_like(logits)
    rows = torch.arange(n, device=logits.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / n


def siglip_loss(image: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor, group=None) -> Tensor:
    """SigLIP on normalised features: local images against the texts of every process."""
    all_text = D.all_gather(text, group)
    logits = logit_scale * image @ all_text.T + logit_bias
    return sigmoid_pair_loss(logits, _targets_offset(image.shape[0], group))


# -- Llip ------------------------------------------------------------------------------------------
def per_token_projection(tokens: Tensor, weight: Tensor) -> Tensor:
    """Each token through its own matrix: ``tokens [B, N, W] x weight [N, W, D] -> [B, N, D]``
    (Llip's ``k_proj`` / ``v_proj``; the official tower's 3-D ``proj``)."""
    return torch.einsum("bnw,nwd->bnd", tokens, weight)


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, N, D] -> [B, heads, N, D/heads]`` (contiguous head-major chunks of D);
    ``[B, D] -> [B, heads, D/heads]``."""
    if x.dim() == 2:
        return x.reshape(x.shape[0], num_heads, -1)
    return x.reshape(x.shape[0], x.shape[1], num_heads, -1).transpose(1, 2)


def llip_mix(K: Tensor, Q: Tensor, V: Tensor, out_proj: Tensor, weight_scale: float) -> Tensor:
    """Every image mixed by every caption: ``K, V [B_img, H, N, d]``, ``Q [B_txt, H, d]`` ->
    ``zv [B_img, B_txt, H*d] @ out_proj`` (un-normalised), softmax over the N tokens at temperature
    ``weight_scale`` (no 1/sqrt(d))."""
    attn = (torch.einsum("vhnd,thd->vthn", K, Q) / weight_scale).softmax(dim=-1)
    zv = torch.einsum("vthn,vhnd->vthd", attn, V)
    return zv.reshape(K.shape[0], Q.shape[0], -1) @ out_proj


def contrastive_similarity(zv: Tensor, zt: Tensor) -> Tensor:
    """Cosine between each mixed image ``zv [B_img, B_txt, D]`` and its caption's normalised ``zt [B_txt, D]``."""
    return torch.einsum("vtd,td->vt", F.normalize(zv, dim=-1), zt)


def _llip_cosines(K: Tensor, Q: Tensor, V: Tensor, zt: Tensor, out_proj: Tensor, weight_scale: float) -> Tensor:
    return contrastive_similarity(llip_mix(K, Q, V, out_proj, weight_scale), zt)


def llip_logits(K: Tensor, Q: Tensor, V: Tensor, zt: Tensor, out_proj: Tensor, weight_scale: float,
                logit_scale: Tensor | float = 1.0, logit_bias: Tensor | float = 0.0,
                chunk: int | None = None) -> Tensor:
    """``logit_scale * <normalize(zv[i, j]), zt_j> + logit_bias`` for all pairs ``[B_img, B_txt]``.

    ``zt``: normalised text features. ``chunk``: captions per block; each block's ``[B_img, chunk, D]``
    mixed representations are recomputed in the backward pass (activation checkpointing), so at most
    one block is held in memory (None: all captions at once, no recomputation).
    """
    if chunk is None or chunk >= Q.shape[0]:
        cos = _llip_cosines(K, Q, V, zt, out_proj, weight_scale)
    else:
        cos = torch.cat([checkpoint(_llip_cosines, K, Q[s:s + chunk], V, zt[s:s + chunk], out_proj, weight_scale,
                                    use_reentrant=False)
                         for s in range(0, Q.shape[0], chunk)], dim=1)
    return logit_scale * cos + logit_bias


def llip_loss(K: Tensor, Q: Tensor, V: Tensor, zt: Tensor, out_proj: Tensor, weight_scale: float,
              logit_scale: Tensor, logit_bias: Tensor, group=None, chunk: int | None = None) -> Tensor:
    """Llip's sigmoid loss (official ``CMPLoss``): this process's images, mixed by the captions of
    every process (queries and normalised text features gathered with gradients; K and V stay
    local), ``-sum log sigmoid / B_local``."""
    all_Q, all_zt = D.all_gather(Q, group), D.all_gather(zt, group)
    logits = llip_logits(K, all_Q, V, all_zt, out_proj, weight_scale, logit_scale, logit_bias, chunk=chunk)
    return sigmoid_pair_loss(logits, _targets_offset(K.shape[0], group))
