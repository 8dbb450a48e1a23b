"""The prototype family's building blocks (MSN, PMSN, PAWS): soft nearest neighbours, sharpening,
ME-MAX in both official forms, a KL-to-prior term with an explicit direction, and the two losses.

Pure functions; batch statistics are reduced over an explicit ``group`` (:mod:`visrep.distributed`),
so 2 processes x B equal 1 process x 2B. With ``n(x) = x / ||x||``::

    snn(q, S, Y)  = softmax(n(q) n(S)^T / tau) Y
    sharpen(p, T) = p^(1/T) / sum_k p^(1/T)
    me_max (MSN)  = sum_k pbar_k log pbar_k + log K;  me_max (PAWS) = sum_k pbar_k log pbar_k

References: facebookresearch/msn @ 4388dc1 and facebookresearch/suncet @ 731547d (``src/losses.py``).
Specification and notes: docs/losses/prototypes.md
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import all_gather, all_reduce
from .precision import float32_loss
from .sinkhorn import sinkhorn

KLDirection = Literal["mean_to_prior", "prior_to_mean"]


def snn(query: Tensor, supports: Tensor, labels: Tensor, tau: float, supports_normalized: bool = False) -> Tensor:
    """Soft nearest neighbours ``softmax(cos(query, supports) / tau) @ labels``: ``[N, C]``.

    ``query`` [N, D], ``supports`` [M, D] (prototypes or labelled embeddings; normalised here, never
    in place, unless ``supports_normalized``), ``labels`` [M, C] (identity for MSN prototypes,
    smoothed one-hot for PAWS)."""
    supports = supports if supports_normalized else F.normalize(supports)
    logits = F.normalize(query) @ supports.t() / tau
    return logits.softmax(dim=1) @ labels


def sharpen(p: Tensor, T: float) -> Tensor:
    """``p^(1/T)`` renormalised over the last dimension (T < 1 sharpens, T = 1 is the identity)."""
    sharp = p ** (1.0 / T)
    return sharp / sharp.sum(dim=1, keepdim=True)


def batch_mean(p: Tensor, group=None) -> Tensor:
    """Mean of ``p`` [N, K] over the rows of every process of ``group`` (the official ``AllReduce``
    of the local means: equal local batch sizes)."""
    return all_reduce(p.mean(dim=0), "mean", group)


def entropy_sum(p: Tensor) -> Tensor:
    """``sum_k p_k log p_k`` over the last dimension (the negative entropy), official form."""
    return -torch.log(p ** (-p)).sum(dim=-1)


def me_max(mean_probs: Tensor, form: Literal["msn", "paws"] = "msn") -> Tensor:
    """Mean-entropy maximisation on the batch-mean prediction ``mean_probs`` [K].

    ``"msn"``: ``sum p log p + log K`` (= KL(pbar || uniform), 0 at the uniform mean, log K at a
    one-hot); ``"paws"``: ``sum p log p`` (no ``+ log K``; -log K at the uniform mean). Which mean to
    pass differs too: MSN the mean of the predictions, PAWS the mean of the *sharpened* predictions.
    """
    r = entropy_sum(mean_probs)
    if form == "msn":
        return r + math.log(float(mean_probs.numel()))
    if form == "paws":
        return r
    raise ValueError(f"me_max form must be 'msn' or 'paws', got {form!r}")


def power_law_prior(num_prototypes: int, exponent: float = 0.25, dtype=torch.float32, device=None) -> Tensor:
    """PMSN's prior ``pi_k = k^(-exponent) / sum_j j^(-exponent)``, k = 1..K (exponent 0: uniform)."""
    if num_prototypes < 1:
        raise ValueError(f"num_prototypes must be >= 1, got {num_prototypes}")
    k = torch.arange(1, num_prototypes + 1, dtype=torch.float64)
    w = k ** (-float(exponent))
    return (w / w.sum()).to(dtype=dtype, device=device)


def prior_kl(mean_probs: Tensor, prior: Tensor, direction: KLDirection = "mean_to_prior") -> Tensor:
    """KL divergence between the batch-mean prediction and a ``prior`` over prototypes.

    ``"mean_to_prior"``: ``KL(pbar || pi) = sum pbar log pbar - sum pbar log pi`` (the PMSN paper's
    regulariser as a generalisation of ME-MAX: exactly MSN's ``me_max`` for a uniform prior);
    ``"prior_to_mean"``: ``KL(pi || pbar) = sum pi log pi - sum pi log pbar`` (lightly's
    ``PMSNLoss``, which calls ``F.kl_div(log pbar, pi)``)."""
    prior = prior.to(mean_probs)
    if direction == "mean_to_prior":
        return entropy_sum(mean_probs) - (mean_probs * prior.log()).sum()
    if direction == "prior_to_mean":
        return (prior * (prior.log() - mean_probs.log())).sum()
    raise ValueError(f"direction must be 'mean_to_prior' or 'prior_to_mean', got {direction!r}")


def cross_entropy(targets: Tensor, probs: Tensor) -> Tensor:
    """``mean_i sum_k -t_ik log p_ik`` (official form ``log(p^(-t))``: 0 where t = 0, even at p = 0)."""
    return torch.log(probs ** (-targets)).sum(dim=1).mean()


def smoothed_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0, dtype=torch.float32) -> Tensor:
    """``[N, C]`` one-hot rows with label smoothing as the official MSN / PAWS code:
    off-value ``smoothing / C``, on-value ``1 - smoothing + smoothing / C``."""
    off = smoothing / num_classes
    out = torch.full((labels.numel(), num_classes), off, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels.reshape(-1, 1).long(), 1.0 - smoothing + off)


def paws_labels_matrix(num_classes: int, per_class: int, world_size: int = 1, unique_classes: bool = False,
                       smoothing: float = 0.0, dtype=torch.float32, device=None) -> Tensor:
    """Official PAWS ``make_labels_matrix``: the smoothed labels of the class-stratified supports,
    rows ``[a, b, c], [a, b, c], ...`` (row r has class ``r % num_classes``), ``[per_class * C * W,
    C * W]``. With ``unique_classes`` each rank holds its own C classes (off = eps / (C W)); without
    it the C*W columns keep off = eps / C, so rows do not sum to one for W > 1 (as the official code)."""
    c, w = num_classes, world_size
    local = per_class * c
    off = smoothing / (c * w) if unique_classes else smoothing / c
    rows = torch.arange(local * w, device=device)
    r, i = rows // local, rows % c             # (for unique_classes) rank block and class of each row
    if unique_classes:
        # official: labels[i::C][r*per_class:(r+1)*per_class, r*C+i] -- row i + C*j of class i with
        # j in [r*per_class, (r+1)*per_class)
        j = rows // c
        r = j // per_class
        col = r * c + i
    else:
        col = i
    out = torch.full((local * w, c * w), off, dtype=dtype, device=device)
    return out.scatter_(1, col.reshape(-1, 1), 1.0 - smoothing + off)


@float32_loss
def msn_loss(anchors: Tensor, targets: Tensor, prototypes: Tensor, *, tau: float = 0.1, T: float = 0.25,
             proto_labels: Tensor | None = None, me_max_weight: float = 1.0, entropy_weight: float = 0.0,
             use_sinkhorn: bool = True, sinkhorn_iters: int = 3, prior: Tensor | None = None,
             kl_direction: KLDirection = "mean_to_prior", sinkhorn_prior: bool = True,
             group=None) -> dict[str, Tensor]:
    """The MSN objective (PMSN with a ``prior``).

    ``anchors`` [V*B, D] (view-major: rows ``v*B:(v+1)*B`` are view v), ``targets`` [B, D] (target
    encoder output: no gradient), ``prototypes`` [K, D] (raw parameters, normalised here),
    ``proto_labels`` [K, K] (None: identity, i.e. label smoothing 0).

    Targets: ``sharpen(snn(targets), T)``, then ``sinkhorn_iters`` Sinkhorn-Knopp iterations
    (marginal ``prior`` when ``sinkhorn_prior``, else uniform) whose sums run over ``group``; repeated once per anchor
    view. Returns ``ce`` (cross-entropy), ``me_max`` (MSN: KL(pbar || U) = ``sum pbar log pbar +
    log K``; PMSN: :func:`prior_kl` in ``kl_direction``), ``entropy`` (mean per-sample entropy, the
    official ``sloss``), ``loss = ce + me_max_weight * me_max + entropy_weight * entropy`` and the
    official logs ``np`` (distinct target argmaxes), ``max_t``, ``min_t``, plus ``probs`` and
    ``targets`` (the repeated targets).
    """
    k = prototypes.shape[0]
    labels = (torch.eye(k, dtype=anchors.dtype, device=anchors.device) if proto_labels is None
              else proto_labels.to(anchors))
    views = anchors.shape[0] // targets.shape[0]
    if views * targets.shape[0] != anchors.shape[0]:
        raise ValueError(f"anchors ({anchors.shape[0]} rows) must be a whole number of views of the "
                         f"{targets.shape[0]} targets")
    probs = snn(anchors, prototypes, labels, tau)
    with torch.no_grad():
        q = sharpen(snn(targets.detach(), prototypes.detach(), labels, tau), T)
        if use_sinkhorn:
            q = sinkhorn(q, sinkhorn_iters, marginal=prior if sinkhorn_prior else None, group=group)
        q = q.repeat(views, 1)
    ce = cross_entropy(q, probs)
    mean_probs = batch_mean(probs, group)
    reg = me_max(mean_probs, "msn") if prior is None else prior_kl(mean_probs, prior, kl_direction)
    ent = -entropy_sum(probs).mean()
    loss = ce + me_max_weight * reg + entropy_weight * ent
    with torch.no_grad():
        top = torch.zeros(k, device=q.device).index_fill_(0, q.argmax(dim=1), 1.0)
        logs = {"np": top.sum().to(q.dtype), "max_t": q.max(dim=1).values.mean(), "min_t": q.min(dim=1).values.mean()}
    return {"loss": loss, "ce": ce, "me_max": reg, "entropy": ent, **logs, "probs": probs, "targets": q}


@float32_loss
def paws_loss(anchor_views: Tensor, anchor_supports: Tensor, anchor_support_labels: Tensor, target_views: Tensor,
              target_supports: Tensor, target_support_labels: Tensor, *, tau: float = 0.1, T: float = 0.25,
              multicrop: int = 6, me_max_weight: float = 1.0, threshold: float = 1e-4,
              group=None) -> dict[str, Tensor]:
    """The PAWS objective (official ``init_paws_loss``).

    ``anchor_views`` [(2 + multicrop) * B, D]: the two large views then the small ones, view-major
    (after the prediction head when there is one); ``target_views`` [2B, D] (projection-head output,
    detached here) **already view-swapped** (row i of view 1 holds view 2's embedding: the caller
    does ``cat([h[B:2B], h[:B]])``). Supports and their labels are local; they are all-gathered over
    ``group`` (gradients flow back to this rank's supports). Targets are sharpened, the small views
    get the mean of the two large-view targets, entries below ``threshold`` are zeroed.
    ME-MAX (PAWS form) on the mean of the *sharpened* anchor predictions, no ``+ log K``.
    """
    batch = anchor_views.shape[0] // (2 + multicrop)
    sup = all_gather(F.normalize(anchor_supports), group)
    sup_labels = all_gather(anchor_support_labels.to(anchor_views), group)
    probs = snn(anchor_views, sup, sup_labels, tau, supports_normalized=True)
    with torch.no_grad():
        t_sup = all_gather(F.normalize(target_supports.detach()), group)
        t_labels = all_gather(target_support_labels.to(target_views), group)
        q = sharpen(snn(target_views.detach(), t_sup, t_labels, tau, supports_normalized=True), T)
        if multicrop > 0:
            mc = 0.5 * (q[:batch] + q[batch:])
            q = torch.cat([q, mc.repeat(multicrop, 1)], dim=0)
        q = torch.where(q < threshold, torch.zeros_like(q), q)
    ce = cross_entropy(q, probs)
    reg = me_max(batch_mean(sharpen(probs, T), group), "paws")
    return {"loss": ce + me_max_weight * reg, "ce": ce, "me_max": reg, "probs": probs, "targets": q}


__all__ = ["batch_mean", "cross_entropy", "entropy_sum", "me_max", "msn_loss", "paws_labels_matrix", "paws_loss",
           "power_law_prior", "prior_kl", "sharpen", "smoothed_one_hot", "snn"]
