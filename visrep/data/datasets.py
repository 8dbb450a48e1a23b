"""Shared dataset pieces, CIFAR-10/100 and the :func:`build_dataset` factory.

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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = [
    "Forwarding",
    "DATASET_NAMES",
    "DEBIAN_FASHION_MNIST_DIR",
    "DatasetNotFoundError",
    "TensorImageDataset",
    "load_cifar",
    "build_dataset",
]

# Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files. Read at
# call time by :func:`visrep.data.fashion_mnist.load_fashion_mnist`, so tests (and unusual
# systems) can point this module attribute elsewhere.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# Default download root when ``download=True`` and no root was given.
DEFAULT_DOWNLOAD_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "visrep", "data")

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "procedural", "coco_captions", "csv_captions",
                 "wds_captions")
_ALIASES = {
    "fmnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar_10": "cifar10",
    "cifar100": "cifar100",
    "cifar_100": "cifar100",
    "imagefolder": "imagefolder",
    "image_folder": "imagefolder",
    "imagenet": "imagefolder",
    "procedural": "procedural",
    "shapes": "procedural",
    "coco_captions": "coco_captions",
    "csv_captions": "csv_captions",
    "wds_captions": "wds_captions",
}


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
class TensorImageDataset(Dataset):
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

    name = _ALIASES.get(name.lower().replace("-", "_"), name)
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


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def build_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                  transform: Callable | None = None, download: bool = False, **kw) -> Dataset:
    """Build a dataset by name: fashion_mnist, cifar10, cifar100, imagefolder or procedural.

    Extra keywords go to the dataset: imagefolder takes ``verify``/``extensions`` (and picks
    ``root/<split>`` when that folder exists, ``split`` "val"/"test" trying both names);
    procedural takes ``num_samples``, ``image_size``, ``in_chans``, ``seed``, ``shapes``, ``label``.
    Caption datasets (:mod:`visrep.data.captions`), under ``root``: ``coco_captions``
    (``annotations/captions_{train,val}2017.json`` + ``{train,val}2017/``), ``csv_captions``
    (``{train,test}.csv``, open_clip's tab-separated ``filepath``/``title`` columns, paths relative to
    root), ``wds_captions`` (webdataset shards ``{train,test}/*.tar`` or ``{train,test}-*.tar``).
    """
    # imported here: those modules build on this one
    from .fashion_mnist import load_fashion_mnist
    from .folders import SafeImageFolder
    from .procedural import ProceduralShapes

    key = _ALIASES.get(str(name).lower().replace("-", "_"))
    if key is None:
        raise ValueError(f"unknown dataset {name!r}; choose from {DATASET_NAMES}")
    if key == "fashion_mnist":
        if kw:
            raise TypeError(f"fashion_mnist takes no extra arguments, got {sorted(kw)}")
        return load_fashion_mnist(split, root=root, transform=transform, download=download)
    if key in ("cifar10", "cifar100"):
        if kw:
            raise TypeError(f"{key} takes no extra arguments, got {sorted(kw)}")
        return load_cifar(key, split, root=root, transform=transform, download=download)
    if key in ("coco_captions", "csv_captions", "wds_captions"):
        return _caption_dataset(key, _normalise_split(split), root, transform)
    if key == "imagefolder":
        if root is None:
            raise DatasetNotFoundError("imagefolder needs data.root / --data-root (root/<class>/<image> "
                                       "or root/<split>/<class>/<image>)")
        base = Path(root)
        names = [split] + (["val", "validation", "test"] if split in ("val", "test", "validation") else [])
        folder = next((base / s for s in names if (base / s).is_dir()), None)
        if folder is None:
            folder = base
            if split != "train":
                warnings.warn(f"imagefolder: no {'/'.join(names)} folder under {base}; the {split} split uses "
                              f"the same images as train (evaluation on training images)", stacklevel=2)
        return SafeImageFolder(folder, transform=transform, **kw)
    return ProceduralShapes(split=split, transform=transform, **kw)


def _caption_dataset(key: str, split: str, root, transform):
    from .captions import TarCaptions, caption_csv, coco_captions

    if root is None:
        raise DatasetNotFoundError(f"{key} needs data.root / --data-root")
    base = Path(root)
    if key == "csv_captions":
        return caption_csv(base / f"{split}.csv", base, transform=transform)
    if key == "coco_captions":
        coco = "train2017" if split == "train" else "val2017"
        return coco_captions(base / "annotations" / f"captions_{coco}.json", base / coco, transform=transform)
    shards = sorted((base / split).glob("*.tar")) or sorted(base.glob(f"{split}-*.tar"))
    if not shards:
        raise DatasetNotFoundError(f"wds_captions: no shards {base / split}/*.tar or {base}/{split}-*.tar")
    return TarCaptions(shards, transform=transform)
