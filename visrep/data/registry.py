"""Every dataset by name: how to build it and the other names it answers to.

``build_dataset(name, split, root=..., transform=..., download=..., **kw)`` looks the name up in
:data:`DATASETS` (aliases included); a new dataset is one :class:`DatasetEntry` line.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from .captions import TarCaptions, caption_csv, coco_captions
from .datasets import DatasetNotFoundError, _normalise_split, load_cifar
from .fashion_mnist import load_fashion_mnist
from .folders import SafeImageFolder
from .procedural import ProceduralShapes


def _no_extra(name: str, kw: dict) -> None:
    if kw:
        raise TypeError(f"{name} takes no extra arguments, got {sorted(kw)}")


def _fashion_mnist(split, root, transform, download, **kw):
    _no_extra("fashion_mnist", kw)
    return load_fashion_mnist(split, root=root, transform=transform, download=download)


def _cifar(name: str):
    def build(split, root, transform, download, **kw):
        _no_extra(name, kw)
        return load_cifar(name, split, root=root, transform=transform, download=download)
    return build


def _imagefolder(split, root, transform, download, **kw):
    """``root/<split>`` when that folder exists ("val"/"test" try both names), else ``root`` itself;
    ``verify`` / ``extensions`` go to :class:`SafeImageFolder`."""
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
                          f"the same images as train (evaluation on training images)", stacklevel=3)
    return SafeImageFolder(folder, transform=transform, **kw)


def _procedural(split, root, transform, download, **kw):
    return ProceduralShapes(split=split, transform=transform, **kw)


def _captions(key: str):
    def build(split, root, transform, download, **kw):
        _no_extra(key, kw)
        if root is None:
            raise DatasetNotFoundError(f"{key} needs data.root / --data-root")
        base, split = Path(root), _normalise_split(split)
        if key == "csv_captions":
            return caption_csv(base / f"{split}.csv", base, transform=transform)
        if key == "coco_captions":
            coco = "train2017" if split == "train" else "val2017"
            return coco_captions(base / "annotations" / f"captions_{coco}.json", base / coco, transform=transform)
        shards = sorted((base / split).glob("*.tar")) or sorted(base.glob(f"{split}-*.tar"))
        if not shards:
            raise DatasetNotFoundError(f"wds_captions: no shards {base / split}/*.tar or {base}/{split}-*.tar")
        return TarCaptions(shards, transform=transform)
    return build


@dataclass(frozen=True)
class DatasetEntry:
    build: Callable[..., Dataset]   # (split, root, transform, download, **kw) -> dataset
    aliases: tuple[str, ...] = ()
    about: str = ""


DATASETS: dict[str, DatasetEntry] = {
    "fashion_mnist": DatasetEntry(_fashion_mnist, ("fmnist", "fashionmnist"),
                                  "in memory; Debian's dataset-fashion-mnist, data.root or download"),
    "cifar10": DatasetEntry(_cifar("cifar10"), ("cifar_10",), "in memory; root holds cifar-10-batches-py/"),
    "cifar100": DatasetEntry(_cifar("cifar100"), ("cifar_100",), "in memory; root holds cifar-100-python/"),
    "imagefolder": DatasetEntry(_imagefolder, ("image_folder", "imagenet"),
                                "files: root/<class>/<image> or root/<split>/<class>/<image>"),
    "procedural": DatasetEntry(_procedural, ("shapes",),
                               "generated shapes (num_samples, image_size, in_chans, seed, shapes, label)"),
    "coco_captions": DatasetEntry(_captions("coco_captions"), (),
                                  "annotations/captions_{train,val}2017.json + {train,val}2017/"),
    "csv_captions": DatasetEntry(_captions("csv_captions"), (),
                                 "{train,test}.csv, open_clip's tab-separated filepath/title columns"),
    "wds_captions": DatasetEntry(_captions("wds_captions"), (), "webdataset shards {train,test}/*.tar"),
}
DATASET_NAMES = tuple(DATASETS)


def dataset_key(name: str) -> str:
    """The registry name of ``name`` or one of its aliases (case and ``-``/``_`` insensitive)."""
    key = str(name).lower().replace("-", "_")
    for canonical, entry in DATASETS.items():
        if key == canonical or key in entry.aliases:
            return canonical
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASET_NAMES}")


def build_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                  transform: Callable | None = None, download: bool = False, **kw) -> Dataset:
    """Build a dataset by name (see :data:`DATASETS`); extra keywords go to the dataset."""
    return DATASETS[dataset_key(name)].build(split, root, transform, download, **kw)
