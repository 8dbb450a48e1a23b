"""DINOv2 losses: DINO cross-entropy on [CLS], iBOT masked-patch cross-entropy, KoLeo, and the
teacher targets (centering with the lazy update, or Sinkhorn-Knopp).

Official code: facebookresearch/dinov2 @ b8931f7 (``dinov2/loss/*``; the normalisation is
``dinov2/train/ssl_meta_arch.py``). :func:`dino_loss`, :func:`ibot_loss` / :func:`ibot_loss_dense`,
:func:`koleo_loss`, :class:`Centering` and :func:`sinkhorn_teacher` follow ``DINOLoss``,
``iBOTPatchLoss``, ``KoLeoLoss`` and ``sinkhorn_knopp_teacher``. Differences: KoLeo neighbours over
every process's rows (``group``; official: per-GPU batch, ``group=False``); centres are means over
every process's rows (official patch centre: mean of per-process means); Sinkhorn in the log domain
(finite where the official ``exp`` overflows). The centre update is lazy, as the official one.
Specification and notes: docs/losses/dino.md
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import all_gather, all_reduce
from .precision import float32_loss
from .sinkhorn import sinkhorn_logits

__all__ = ["Centering", "dino_loss", "ibot_loss", "ibot_loss_dense", "koleo_loss", "koleo_nn_index",
           "sinkhorn_teacher", "ibot_mask_weights"]


def _chunks(x: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


@float32_loss
def dino_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor],
              student_temp: float = 0.1) -> Tensor:
    """``DINOLoss.forward``: ``-sum_{s in student} sum_{t in teacher} mean_b sum_k t log_softmax(s / T)``.

    ``student``: logits, a tensor ``[B, K]`` or a list of chunks; ``teacher``: target probabilities,
    a tensor or a list of chunks, every chunk with the student chunks' batch size. Computed as one
    product of the summed targets with the summed log-probabilities (no loop over pairs).
    """
    s = torch.stack(_chunks(student))                    # [S, B, K]
    t = torch.stack(_chunks(teacher))                    # [T, B, K]
    if s.shape[1:] != t.shape[1:]:
        raise ValueError(f"dino_loss: student chunks {tuple(s.shape[1:])} and teacher chunks "
                         f"{tuple(t.shape[1:])} must have the same [batch, prototypes] shape")
    lsm = F.log_softmax(s / student_temp, dim=-1).sum(0)  # [B, K]
    return -(t.sum(0) * lsm).sum(-1).mean()


def ibot_mask_weights(masks: Tensor) -> Tensor:
    """Per masked patch ``1 / #masked in its image`` (row-major order of ``masks [n_img, N]``)."""
    counts = masks.sum(-1, keepdim=True).clamp(min=1.0)
    return (1 / counts).expand_as(masks)[masks]


@float32_loss
def ibot_loss(student_masked: Tensor, teacher_masked: Tensor, masks: Tensor, student_temp: float = 0.1,
              weights: Tensor | None = None) -> Tensor:
    """``iBOTPatchLoss.forward_masked``: ``-sum_i w_i <t_i, log_softmax(s_i / T)> / n_images``.

    ``student_masked`` [M, K] logits and ``teacher_masked`` [M, K] targets at the masked patches
    (row-major order of ``masks``), ``masks`` bool ``[n_images, N]``; ``weights`` [M] default to
    :func:`ibot_mask_weights` (the official collate passes them, float32). Extra rows past the
    number of masked patches (the official upper-bound buffer) are ignored.
    """
    n = int(masks.sum()) if weights is None else weights.shape[0]
    ce = (teacher_masked[:n] * F.log_softmax(student_masked[:n] / student_temp, dim=-1)).sum(-1)
    w = ibot_mask_weights(masks) if weights is None else weights
    return -(ce * w).sum() / masks.shape[0]


@float32_loss
def ibot_loss_dense(student: Tensor, teacher: Tensor, masks: Tensor, student_temp: float = 0.1) -> Tensor:
    """``iBOTPatchLoss.forward``: every patch's cross-entropy ``[n_img, N]``, averaged over each image's
    masked patches, then over images."""
    ce = (teacher * F.log_softmax(student / student_temp, dim=-1)).sum(-1)
    per_image = (ce * masks.float()).sum(-1) / masks.sum(-1).clamp(min=1.0)
    return -per_image.mean()


@torch.no_grad()
def koleo_nn_index(x: Tensor, candidates: Tensor | None = None, offset: int = 0) -> Tensor:
    """Nearest neighbour (max inner product) of each row of ``x`` among ``candidates`` (default
    ``x``), excluding itself: row ``i`` of ``x`` is row ``offset + i`` of ``candidates``."""
    cand = x if candidates is None else candidates
    dots = x @ cand.t()
    rows = torch.arange(x.shape[0], device=x.device)
    dots[rows, rows + offset] = -1
    return dots.argmax(dim=1)


@float32_loss
def koleo_loss(x: Tensor, eps: float = 1e-8, group=False) -> Tensor:
    """KoLeo entropy estimator ``-mean_i log(d(x_i, x_nn(i)) + eps)`` on L2-normalised rows.

    ``group=False``: this process's rows only (official, per-GPU). ``group=None`` (default group) or a
    process group: neighbours among every process's rows, each process averaging over its own rows.
    """
    x = F.normalize(x, eps=eps, p=2, dim=-1)
    if group is False:
        cand, offset = x, 0
    else:
        from ..distributed import rank_in

        cand = all_gather(x, group)
        offset = rank_in(group) * x.shape[0]
    nn_idx = koleo_nn_index(x.detach(), cand.detach(), offset)
    d = (x - cand[nn_idx] + eps).norm(p=2, dim=-1)
    return -torch.log(d + eps).mean()


@torch.no_grad()
def sinkhorn_teacher(teacher_logits: Tensor, teacher_temp: float, n_iters: int = 3, group=None) -> Tensor:
    """Sinkhorn-Knopp targets ``[B, K]`` from teacher logits (float32, or float64 for float64 input;
    rows sum to one)."""
    x = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    return sinkhorn_logits(x / teacher_temp, n_iters, group=group)


class Centering(nn.Module):
    """The teacher centre with the official lazy update (see the module docstring).

    Buffers: ``center`` ``[1, K]``, ``pending`` (the reduced batch mean not yet folded in) and
    ``has_pending``. ``momentum``: the centre's EMA momentum (0.9).
    """

    def __init__(self, dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))
        self.register_buffer("pending", torch.zeros(1, dim))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def apply_pending(self) -> None:
        """Fold a recorded batch mean into the centre (a no-op without one)."""
        if bool(self.has_pending):
            self.center.mul_(self.momentum).add_(self.pending.to(self.center.dtype), alpha=1 - self.momentum)
            self.has_pending.fill_(False)

    @torch.no_grad()
    def softmax(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((t - c) / T)`` after folding in the pending update (``softmax_center_teacher``)."""
        self.apply_pending()
        t = teacher_logits.to(torch.promote_types(teacher_logits.dtype, self.center.dtype))  # bf16 -> fp32
        return F.softmax((t - self.center.to(t.dtype)) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, group=None) -> None:
        """Record the mean of ``teacher_logits`` ``[..., K]`` over every row of every process; folded
        in at the next :meth:`softmax` (``update_center``)."""
        rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # sums in fp32 at least
        stats = torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])])
        stats = all_reduce(stats, "sum", group)
        self.pending.copy_((stats[:-1] / stats[-1].clamp(min=1)).unsqueeze(0))
        self.has_pending.fill_(True)
