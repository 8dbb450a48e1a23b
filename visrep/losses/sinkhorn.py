"""Sinkhorn-Knopp balancing of soft assignments (MSN, PMSN, DINOv2), with explicit distributed sums.

Both official codes run the same iteration on ``Q = weights.T`` ([K prototypes, B samples]):
``Q /= sum(Q)``; then ``n_iters`` times: each prototype row is scaled to mass ``1/K`` (row sums
all-reduced over processes), each sample column to ``1/B`` (column sums local, ``B`` the global
batch); finally ``Q *= B`` so that every sample's assignment sums to one. With a ``marginal``
(PMSN's prior) the prototype rows get mass ``marginal[k]`` instead of ``1/K``; the uniform marginal
gives exactly the official result.

``sinkhorn`` takes non-negative weights (MSN passes sharpened probabilities); ``sinkhorn_logits``
takes scores (DINOv2 passes ``teacher_logits / temperature``) and runs the same iteration in the
log domain: mathematically the official result, but finite in float32 where the official DINOv2
code (``exp`` of raw logits) overflows.
"""
from __future__ import annotations

import math

import torch

from ..distributed import all_reduce, world_in


@torch.no_grad()
def sinkhorn(weights: torch.Tensor, n_iters: int = 3, marginal: torch.Tensor | None = None,
             group=None) -> torch.Tensor:
    """Balanced assignments ``[B, K]`` (rows sum to one) from non-negative ``weights`` ``[B, K]``.

    ``marginal``: target mass per prototype ``[K]`` (sums to one; ``None`` = uniform ``1/K``).
    ``group``: process group whose batches are balanced jointly (``None`` = default group).
    Does not modify ``weights`` (the official MSN function does, in place).
    """
    if weights.dim() != 2:
        raise ValueError(f"sinkhorn expects [batch, prototypes] weights, got shape {tuple(weights.shape)}")
    q = weights.t().clone()  # [K, B]
    k, b_local = q.shape
    b = b_local * world_in(group)
    row_mass = (torch.full((k, 1), 1.0 / k, dtype=q.dtype, device=q.device) if marginal is None
                else marginal.to(q).reshape(k, 1))
    q /= all_reduce(q.sum(), "sum", group)
    for _ in range(n_iters):
        q *= row_mass / all_reduce(q.sum(dim=1, keepdim=True), "sum", group)
        q /= q.sum(dim=0, keepdim=True) * b
    return (q * b).t()


def _logsumexp(x: torch.Tensor, dim: int | None, group, across: bool) -> torch.Tensor:
    """log-sum-exp over ``dim`` (all elements if None), also over processes when ``across``."""
    if x.numel():
        m = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    else:  # no rows on this process (e.g. no masked patch): it still joins the collectives
        m = x.new_full(() if dim is None else [1 if d == dim else n for d, n in enumerate(x.shape)], -math.inf)
    if across:
        m = all_reduce(m, "max", group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (x - m).exp()
    s = s.sum() if dim is None else s.sum(dim=dim, keepdim=True)
    if across:
        s = all_reduce(s, "sum", group)
    return s.log() + m


@torch.no_grad()
def sinkhorn_logits(logits: torch.Tensor, n_iters: int = 3, marginal: torch.Tensor | None = None,
                    group=None) -> torch.Tensor:
    """``sinkhorn(exp(logits))``, run in the log domain in float32 (float64 inputs stay float64):
    the same iteration, but finite for logits whose exponentials overflow or whose prototype rows
    underflow to zero. Processes may hold different numbers of samples (DINOv2's masked patches):
    ``B`` is the total over the group, as the official iBOT Sinkhorn."""
    lq = logits.to(torch.promote_types(logits.dtype, torch.float32)).t()  # [K, B]
    k, b_local = lq.shape
    b = b_local * world_in(group)
    if world_in(group) > 1:
        b = float(all_reduce(torch.tensor([float(b_local)], device=lq.device), "sum", group))
    log_b = math.log(max(b, 1.0))
    log_row = (torch.full((k, 1), -math.log(k), device=lq.device) if marginal is None
               else marginal.float().to(lq.device).reshape(k, 1).log())
    lq = lq - _logsumexp(lq, None, group, across=True)
    for _ in range(n_iters):
        lq = lq - _logsumexp(lq, 1, group, across=True) + log_row
        lq = lq - _logsumexp(lq, 0, group, across=False) - log_b
    return (lq + log_b).exp().t()
