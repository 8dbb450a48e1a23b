"""Subsets of a labelled training set: long-tailed class profiles and label-split files.

* :func:`long_tailed_indices`: keep ``n_c`` images of class ``c`` with ``n_0 / n_last =
  imbalance_ratio`` (e.g. 100), counts following a power law ``n_c = n_max (c + 1)^(-a)`` (``a =
  log(ratio) / log(C)``) or the exponential profile of the long-tailed CIFAR benchmarks
  (``n_c = n_max ratio^(-c / (C - 1))``); which images are kept comes from ``seed``. For PMSN's claim
  (a power-law prior helps on class-imbalanced data): ``data.long_tail_ratio=100``.
* :func:`read_file_list` / :func:`write_file_list`: a curated training subset (``visrep curate``,
  ``data.subset_file``) as dataset indices or file paths, one per line.
* :func:`label_split` / :func:`write_label_split` / :func:`read_label_split`: the labelled images of
  a low-shot split (k per class or a fraction of each class, seeded) as a text file of dataset
  indices, one per line (the role of the official ``imagenet_subsets/*.txt`` and
  ``cifar10_subsets/*.txt`` lists, which hold file names), so that pretraining (PAWS's supports,
  ``method.labels_file``) and evaluation use the very same images.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def _class_pools(labels: Tensor, seed: int) -> list[tuple[int, Tensor]]:
    """Each class's indices in a seeded random order, classes ascending."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    pools = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        idx = (labels == c).nonzero().flatten()
        pools.append((c, idx[torch.randperm(idx.numel(), generator=g)]))
    return pools


def long_tailed_counts(num_classes: int, n_max: int, imbalance_ratio: float, profile: str = "power") -> list[int]:
    """Images per class (class 0 the most frequent) for a long-tailed subset."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    if num_classes == 1:
        return [n_max]
    if profile == "power":
        a = math.log(imbalance_ratio) / math.log(num_classes)
        counts = [n_max * (c + 1) ** (-a) for c in range(num_classes)]
    elif profile == "exponential":
        counts = [n_max * imbalance_ratio ** (-c / (num_classes - 1)) for c in range(num_classes)]
    else:
        raise ValueError(f"profile must be 'power' or 'exponential', got {profile!r}")
    return [max(1, int(n)) for n in counts]


def long_tailed_indices(labels: Tensor, imbalance_ratio: float = 100.0, seed: int = 0,
                        profile: str = "power") -> Tensor:
    """Sorted dataset indices of a long-tailed subset of ``labels`` (see the module docstring)."""
    pools = _class_pools(labels, seed)
    n_max = min(p.numel() for _, p in pools)
    counts = long_tailed_counts(len(pools), n_max, imbalance_ratio, profile)
    return torch.cat([p[:n] for (_, p), n in zip(pools, counts)]).sort().values


def label_split(labels: Tensor, per_class: int | None = None, fraction: float | None = None,
                seed: int = 0) -> Tensor:
    """Sorted indices of a class-balanced labelled split: ``per_class`` images of every class, or a
    ``fraction`` of each class (at least one)."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    out = []
    for _, p in _class_pools(labels, seed):
        n = per_class if per_class is not None else max(1, round(fraction * p.numel()))
        out.append(p[:n])
    return torch.cat(out).sort().values


def write_label_split(path: str | Path, indices: Tensor, comment: str = "") -> Path:
    """Write ``indices`` one per line (``#`` lines are comments)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    path.write_text(head + "".join(f"{int(i)}\n" for i in torch.as_tensor(indices).tolist()))
    return path


def read_label_split(path: str | Path) -> Tensor:
    """Indices written by :func:`write_label_split` (int64, in file order)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label-split file not found: {path}")
    rows = [line.strip() for line in path.read_text().splitlines()]
    try:
        return torch.tensor([int(r) for r in rows if r and not r.startswith("#")], dtype=torch.long)
    except ValueError as e:
        raise ValueError(f"{path}: every non-comment line must be one dataset index ({e})") from None




def write_file_list(path: str | Path, indices, names: list[str] | None = None) -> Path:
    """One entry per line: the dataset index, or ``names[index]`` (file paths) when given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [str(names[i]) if names is not None else str(int(i)) for i in indices]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_file_list(path: str | Path, names: list[str] | None = None) -> list[int]:
    """Dataset indices of a file list (integers, or paths looked up in ``names``)."""
    entries = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    if all(e.lstrip("-").isdigit() for e in entries):
        return [int(e) for e in entries]
    if names is None:
        raise ValueError(f"{path} lists file paths but the dataset has no file names to match them")
    where = {str(n): i for i, n in enumerate(names)}
    missing = [e for e in entries if e not in where]
    if missing:
        raise ValueError(f"{path}: {len(missing)} entries are not in the dataset, e.g. {missing[0]!r}")
    return [where[e] for e in entries]


__all__ = ["label_split", "long_tailed_counts", "long_tailed_indices", "read_file_list", "read_label_split",
           "write_file_list", "write_label_split"]
