"""Shared dataset pieces and CIFAR-10/100 (the :func:`build_dataset` factory: :mod:`visrep.data.registry`).

The datasets themselves live in :mod:`~visrep.data.fashion_mnist` (IDX reader, Fashion-MNIST),
:mod:`~visrep.data.folders` (ImageFolder that skips unreadable files) and
:mod:`~visrep.data.procedural` (generated shapes); this module holds what they share: the
:class:`DatasetNotFoundError`, the in-memory :class:`TensorImageDataset` and the on-disk locations.

Every dataset yields ``(image, label)`` where ``image`` is a ``uint8`` CHW tensor (a
``torchvision.tv_tensors.Image``) before ``transform``, so torchvision transforms v2 apply directly.
Each dataset exposes ``num_classes``, ``in_chans``, ``image_size`` (native side, ``None`` when it
varies) and ``classes`` when known.

In-memory datasets (Fashion-MNIST, CIFAR) also offer ``tensors() -> (images [N,C,H,W] uint8, labels
[N] int64)``, the fast path used by :class:`visrep.data.loaders.InMemoryBatches`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = [
    "Forwarding",
    "DEBIAN_FASHION_MNIST_DIR",
    "DatasetNotFoundError",
    "InMemory",
    "in_memory",
    "TensorImageDataset",
    "load_cifar",
]

# Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files. Read at
# call time by :func:`visrep.data.fashion_mnist.load_fashion_mnist`, so tests (and unusual
# systems) can point this module attribute elsewhere.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# Default download root when ``download=True`` and no root was given.
DEFAULT_DOWNLOAD_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "visrep", "data")

class Forwarding:
    """Mixin for a dataset wrapping ``self.dataset``: the attributes named in ``forwarded`` are read
    from the wrapped dataset, and setting ``transform`` sets the wrapped dataset's."""

    forwarded: tuple[str, ...] = ("num_classes", "classes", "in_chans", "transform", "captions")

    def __getattr__(self, name):
        if name in type(self).forwarded and "dataset" in self.__dict__:
            return getattr(self.__dict__["dataset"], name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name == "transform":
            self.dataset.transform = value
        else:
            super().__setattr__(name, value)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files could not be found (or fetched); the message lists every option tried."""


def _as_image(x: torch.Tensor) -> torch.Tensor:
    return tv_tensors.Image(x)


def _normalise_split(split: str) -> str:
    s = str(split).lower()
    if s in ("train", "training"):
        return "train"
    if s in ("test", "val", "valid", "validation", "eval", "t10k"):
        return "test"
    raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'/'val'")


# --------------------------------------------------------------------------------------------
# In-memory tensor dataset
# --------------------------------------------------------------------------------------------
@runtime_checkable
class InMemory(Protocol):
    """A dataset held in memory: ``tensors()`` gives every image (uint8 [N,C,H,W]) and label at once, the
    batched fast path (:class:`visrep.data.loaders.InMemoryBatches`). Any dataset with such a method is
    one (``isinstance(ds, InMemory)``); ours subclass it to say so."""

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def in_memory(ds) -> bool:
    """Whether ``ds`` offers the batched in-memory path (``tensors()``): an :class:`InMemory` dataset,
    or a :class:`Forwarding` wrapper that forwards ``tensors`` of one."""
    if isinstance(ds, Forwarding) and "tensors" in type(ds).forwarded:
        return in_memory(ds.__dict__.get("dataset"))
    return isinstance(ds, InMemory)


class TensorImageDataset(InMemory, Dataset):
    """Images held in memory as one ``uint8`` tensor ``[N, C, H, W]`` plus ``int64`` labels ``[N]``."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        num_classes: int | None = None,
        name: str = "tensor",
    ):
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.classes = list(classes) if classes is not None else None
        if num_classes is None:
            num_classes = len(self.classes) if self.classes is not None else int(labels.max()) + 1 if len(labels) else 0
        self.num_classes = int(num_classes)
        self.in_chans = int(images.shape[1])
        h, w = int(images.shape[2]), int(images.shape[3])
        self.image_size = h if h == w else (h, w)
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int):
        img = _as_image(self.images[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images uint8 [N,C,H,W], labels int64 [N])``: the whole dataset, no copy."""
        return self.images, self.labels

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, in_chans={self.in_chans}, "
                f"image_size={self.image_size}, num_classes={self.num_classes})")


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (via torchvision, held in memory)
# --------------------------------------------------------------------------------------------
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_cifar(name: str, split: str = "train", root: str | os.PathLike | None = None,
               transform: Callable | None = None, download: bool = False) -> TensorImageDataset:
    """CIFAR-10/100 through torchvision, converted to an in-memory ``uint8 [N,3,32,32]`` dataset.

    ``root`` is the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (or that folder
    itself); it is required unless ``download=True``.
    """
    import torchvision

    name = name.lower().replace("-", "").replace("_", "")
    split = _normalise_split(split)
    folder = _CIFAR_FOLDERS[name]
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    if root is not None and Path(root).name == folder:
        root = Path(root).parent
    if root is None and not download:
        raise DatasetNotFoundError(
            f"{name} needs a data root: pass --data-root / data.root=<folder containing {folder}/>, "
            "or set data.download=true to fetch it with torchvision (needs internet)."
        )
    root = Path(root) if root is not None else Path(DEFAULT_DOWNLOAD_ROOT)
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except Exception as e:
        how = ("download failed (data.download=true needs internet)" if download
               else "set data.download=true to fetch it with torchvision (needs internet)")
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found or corrupt under data.root / --data-root = {root} "
            f"(expected {root / folder}/): {type(e).__name__}: {e}. Fix: point data.root at the folder "
            f"containing {folder}/, or {how}."
        ) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    out = TensorImageDataset(images, labels, transform=transform, classes=ds.classes, name=name)
    out.split = split
    out.source = str(root / folder)
    return out
