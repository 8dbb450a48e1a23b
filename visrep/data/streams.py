"""Batches as dicts, and the extra data streams a method can declare (e.g. PAWS's labelled supports).

Every batch the engine hands a method is a dict: ``image``, ``label`` (int64, -1 when unknown),
``index`` (dataset indices) and, when asked for, ``caption`` (each image's list of captions).
:class:`DictDataset` + :func:`collate_dicts` give the same dicts on the DataLoader path as
:func:`memory_batch` on the in-memory path.

:class:`ClassBalancedIndices` is the ``class_balanced`` stream: a labelled subset chosen once from
the seed, then at every step ``classes x per_class`` indices, a pure function of
``(seed, stream name, step, rank)``, so that a resumed (or re-sharded) run gets the same supports.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from visrep.utils import mix_seed

from .datasets import in_memory


def _captions_of(dataset, index: int) -> list[str]:
    fn = getattr(dataset, "captions", None)
    if fn is None:
        raise ValueError(f"{type(dataset).__name__} has no captions (a captions(index) method), but the method "
                         "asked for them")
    return list(fn(int(index)))


def memory_batch(dataset, images: Tensor, labels: Tensor | None, index: Tensor, captions: bool = False) -> dict:
    """The batch dict of an in-memory dataset's rows ``index`` (``images``/``labels`` already sliced)."""
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
    batch = {"image": images, "label": labels, "index": index}
    if captions:
        batch["caption"] = [_captions_of(dataset, i) for i in index.tolist()]
    return batch


class DictDataset(Dataset):
    """Any ``(image, label)`` dataset as one yielding ``{"image", "label", "index"[, "caption"]}``."""

    def __init__(self, dataset, captions: bool = False, crops: dict | None = None, seed: int = 0):
        from .crops import CropViews

        self.dataset, self.captions, self.seed = dataset, captions, seed
        self.crops = CropViews(crops) if crops else None  # views cut here, in the loader workers

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or ``(index, epoch)`` (a :class:`ResumableSampler` with ``with_epoch``) to
        draw the sample's views from a generator seeded by ``(seed, epoch, index)``."""
        i, epoch = key if isinstance(key, tuple) else (key, None)
        item = self.dataset[i]
        image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, -1)
        out = {"label": -1 if label is None else int(label), "index": int(i)}
        if self.crops is not None:  # full-resolution images differ in size: only their views travel
            g = None if epoch is None else torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
            out["crops"] = self.crops(image, g)
        else:
            out["image"] = image
        if self.captions:
            out["caption"] = _captions_of(self.dataset, i)
        return out


def collate_dicts(items: Sequence[dict]) -> dict:
    """Stack images (or each kind of view), make label / index tensors, keep captions as a list."""
    out: dict[str, Any] = {
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if items and "crops" in items[0]:
        out["crops"] = {k: torch.stack([it["crops"][k] for it in items]) for k in items[0]["crops"]}
    else:
        out["image"] = torch.stack([torch.as_tensor(it["image"]) for it in items])
    if items and "caption" in items[0]:
        out["caption"] = [it["caption"] for it in items]
    return out


def _labels_of(dataset) -> Tensor:
    if in_memory(dataset):
        return torch.as_tensor(dataset.tensors()[1], dtype=torch.long)
    for attr in ("targets", "labels"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr), dtype=torch.long)
    raise ValueError(f"a class_balanced stream needs labels; {type(dataset).__name__} exposes neither "
                     "tensors() nor targets/labels")


class ClassBalancedIndices:
    """Indices of a ``class_balanced`` stream (see :class:`visrep.methods.base.StreamSpec`)."""

    def __init__(self, dataset, spec, *, name: str, seed: int, rank: int, world_size: int):
        labels = _labels_of(dataset)
        self.name, self.seed, self.rank, self.world = name, int(seed), int(rank), int(world_size)
        self.spec = spec
        g = torch.Generator().manual_seed(mix_seed(seed, self._tag, 0x5EED))
        self.pools: list[Tensor] = []
        allowed = None
        if getattr(spec, "labelled_file", None):
            from visrep.data.subsets import read_label_split

            allowed = torch.zeros(labels.numel(), dtype=torch.bool)
            allowed[read_label_split(spec.labelled_file)] = True
        for c in torch.unique(labels[labels >= 0]).tolist():
            idx = ((labels == c) if allowed is None else (labels == c) & allowed).nonzero().flatten()
            if idx.numel() == 0:
                continue
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            if spec.labels_per_class is not None:
                idx = idx[:spec.labels_per_class]
            elif spec.label_fraction is not None:
                idx = idx[:max(1, round(spec.label_fraction * idx.numel()))]
            self.pools.append(idx.sort().values)
        if not self.pools:
            raise ValueError(f"stream {name!r}: the dataset has no labelled images")
        self.classes = spec.classes or len(self.pools)
        if self.classes > len(self.pools):
            raise ValueError(f"stream {name!r}: {self.classes} classes per step asked, the data has {len(self.pools)}")

    @property
    def _tag(self) -> int:
        return zlib.crc32(self.name.encode())

    @property
    def labelled(self) -> Tensor:
        """Every index of the labelled subset."""
        return torch.cat(self.pools).sort().values

    def indices(self, step: int) -> Tensor:
        """``classes x per_class`` indices for ``step`` on this rank, class-major."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self._tag, step, self.rank))
        chosen = (torch.randperm(len(self.pools), generator=g)[:self.classes].sort().values
                  if self.classes < len(self.pools) else range(len(self.pools)))
        out = []
        for c in chosen:
            pool = self.pools[int(c)]
            k = self.spec.per_class
            pick = (torch.randperm(pool.numel(), generator=g)[:k] if k <= pool.numel()
                    else torch.randint(pool.numel(), (k,), generator=g))
            out.append(pool[pick])
        return torch.cat(out)


__all__ = ["ClassBalancedIndices", "DictDataset", "collate_dicts", "memory_batch"]
