"""k-nearest-neighbour classification on frozen features: DINO / DINOv2's weighted k-NN.

DINOv2's ``eval/knn.py``: L2-normalised features, cosine similarity, the max(k) nearest training
rows, votes ``softmax(sim / T)`` over them (T = 0.07) summed per class for each k in 10, 20, 100,
200 (DINO: ``exp(sim / T)``, the same argmax). Parity: tests/parity/test_eval_protocols.py.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

# Bound on the elements of one [chunk, n_train] similarity block when chunk_size is not given
# (2**24 float32 elements = 64 MiB).
_BLOCK_ELEMS = 1 << 24


@torch.no_grad()
def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: int | Iterable[int] = (10, 20, 100, 200),
    *,
    temperature: float = 0.07,
    weighting: str = "exp",
    metric: str = "cosine",
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> dict[int, float]:
    """Top-1 accuracy (%) of k-NN classification of ``test_feats`` against ``train_feats``, per k.

    ``metric="cosine"`` (default, as in DINO) L2-normalises both sets and ranks neighbours by cosine
    similarity; ``metric="euclidean"`` ranks by Euclidean distance on the features as given (the
    classical raw-pixel k-NN baseline).

    ``weighting="exp"`` (DINO): each of the k neighbours votes for its class with weight
    ``exp(sim / temperature)`` (``temperature`` = 0.07), normalised over the max(ks) neighbours as
    DINOv2 does (same argmax); for the Euclidean metric ``sim`` is the negative distance.
    ``weighting="uniform"``: one vote per neighbour (ties go to the lowest class
    index). The prediction is the class with the largest summed vote.

    All k in ``ks`` are evaluated from one top-``max(ks)`` search. Test rows are processed in chunks
    so that one similarity block stays ~64 MiB (or ``chunk_size`` rows). Returns ``{k: accuracy}``.
    """
    if weighting not in ("exp", "uniform"):
        raise ValueError(f"weighting must be 'exp' or 'uniform', got {weighting!r}")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    ks = sorted({int(ks)} if isinstance(ks, int) else {int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    n_train = train_feats.shape[0]
    if ks[-1] > n_train:
        raise ValueError(f"k={ks[-1]} exceeds the {n_train} training samples")
    device = torch.device(device) if device is not None else train_feats.device

    train = train_feats.to(device, torch.float32)
    train_y = train_labels.to(device, torch.int64)
    test_y = test_labels.to(device, torch.int64)
    if num_classes is None:
        num_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    if metric == "cosine":
        train = F.normalize(train, dim=1)
        train_sq = None
    else:
        train_sq = (train * train).sum(1)
    if chunk_size is None:
        chunk_size = max(1, min(4096, _BLOCK_ELEMS // max(1, n_train)))

    correct = {k: 0 for k in ks}
    n_test = test_feats.shape[0]
    for start in range(0, n_test, chunk_size):
        q = test_feats[start : start + chunk_size].to(device, torch.float32)
        y = test_y[start : start + chunk_size]
        if metric == "cosine":
            sim = F.normalize(q, dim=1) @ train.T
        else:  # negative Euclidean distance, so that larger is closer
            d2 = torch.addmm(train_sq[None, :], q, train.T, alpha=-2.0).add_((q * q).sum(1, keepdim=True))
            d2.clamp_min_(0)
            # uniform votes only need the ranking, for which the squared distance suffices
            sim = d2.neg_() if weighting == "uniform" else d2.sqrt_().neg_()
        for k, votes in _votes(sim, train_y, ks, weighting, temperature, num_classes).items():
            correct[k] += int((votes.argmax(dim=1) == y).sum().item())
        del sim
    return {k: 100.0 * correct[k] / max(1, n_test) for k in ks}


def _votes(sim: Tensor, train_y: Tensor, ks: list[int], weighting: str, temperature: float,
           num_classes: int) -> dict[int, Tensor]:
    """Class votes ``{k: [b, C]}`` from similarities ``[b, n_train]``: the ``max(ks)`` nearest rows, weights
    ``softmax(sim / T)`` over them (DINOv2's ``KnnModule.forward``; ``"uniform"``: 1 each), summed per class
    over the first k."""
    top_sim, top_idx = sim.topk(ks[-1], dim=1, largest=True, sorted=True)
    top_y = train_y[top_idx]  # [b, kmax]
    w = torch.softmax(top_sim / temperature, dim=1) if weighting == "exp" else torch.ones_like(top_sim)
    out = {}
    for k in ks:
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=w.dtype)
        out[k] = votes.scatter_add_(1, top_y[:, :k], w[:, :k])
    return out


@torch.no_grad()
def knn_scores(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, ks: Iterable[int] = (10, 20, 100, 200),
               *, temperature: float = 0.07, num_classes: int | None = None) -> dict[int, Tensor]:
    """DINOv2's k-NN class probabilities ``{k: [n_test, C]}`` (cosine, ``softmax(sim / T)`` over the
    max(k) neighbours, summed per class over the first k), in the features' dtype, in one block."""
    ks = sorted({int(k) for k in ks})
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    sim = F.normalize(test_feats, dim=1) @ F.normalize(train_feats, dim=1).T
    return _votes(sim, train_labels.to(torch.int64), ks, "exp", temperature, num_classes)
