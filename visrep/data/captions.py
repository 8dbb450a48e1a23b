"""Image-caption datasets: class names through templates, CSV / COCO-JSON caption files, webdataset shards.

Every dataset here yields ``(image, label)`` like the others (uint8 CHW image before ``transform``,
label -1 when there is none) and answers ``captions(index) -> list[str]`` (all true captions of the
image), which is what a method asking for ``StreamSpec(captions=True)`` receives.

* :class:`TemplateCaptions` -- any labelled dataset (Fashion-MNIST, CIFAR, procedural) with captions
  built from its class names: ``[t.format(class) for t in templates]`` (``data.caption_templates``);
  keeps the in-memory fast path (``tensors()``).
* :func:`caption_csv` -- open_clip's CSV layout: one row per (image, caption), columns ``filepath`` and
  ``title``, tab-separated by default; rows of the same image are grouped.
* :func:`coco_captions` -- the COCO captions JSON layout (``images: [{id, file_name}]``,
  ``annotations: [{image_id, caption}]``), typically 5 captions per image.
* :class:`TarCaptions` -- webdataset tar shards (``<key>.jpg|png|webp`` + ``<key>.txt`` (one caption per
  line) or ``<key>.json`` with ``caption`` / ``captions``), indexed once, read by offset (map-style,
  so the engine's sharded, resumable sampler applies).
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .datasets import DatasetNotFoundError, Forwarding, _as_image, in_memory

__all__ = ["TemplateCaptions", "CaptionFiles", "caption_csv", "coco_captions", "TarCaptions", "read_image"]

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_image(data: bytes | str | Path) -> torch.Tensor:
    """An encoded image (bytes or a path) as ``uint8 [3, H, W]``."""
    from PIL import Image

    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(src) as im:
        arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
        return arr.reshape(im.size[1], im.size[0], 3).permute(2, 0, 1).contiguous()


class TemplateCaptions(Forwarding, Dataset):
    """``dataset`` with captions from its class names: ``captions(i) = [t.format(class_of_i) for t in templates]``."""

    def __init__(self, dataset, templates: Sequence[str] = ("a photo of a {}.",)):
        classes = getattr(dataset, "classes", None)
        if not classes:
            raise ValueError(f"{type(dataset).__name__} has no class names to build captions from")
        self.dataset, self.templates = dataset, tuple(templates)
        self.classes = list(classes)
        self.targets = self._labels()

    def _labels(self) -> list[int]:
        if in_memory(self.dataset):
            return self.dataset.tensors()[1].tolist()
        if hasattr(self.dataset, "targets"):
            return list(self.dataset.targets)
        return [int(self.dataset[i][1]) for i in range(len(self.dataset))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    forwarded = ("tensors", "num_classes", "in_chans", "image_size", "transform")

    def captions(self, index: int) -> list[str]:
        name = self.classes[self.targets[index]]
        return [t.format(name) for t in self.templates]


class CaptionFiles(Dataset):
    """Images on disk with their captions: ``items`` is a list of ``(path, [captions])``."""

    in_chans = 3
    num_classes = None
    classes = None

    def __init__(self, items: Sequence[tuple[Path, list[str]]], transform: Callable | None = None):
        if not items:
            raise DatasetNotFoundError("no image-caption pairs found")
        self.items, self.transform = list(items), transform
        self.targets = [-1] * len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        img = _as_image(read_image(self.items[index][0]))
        return (self.transform(img) if self.transform is not None else img), -1

    def captions(self, index: int) -> list[str]:
        return list(self.items[index][1])


def _grouped(pairs) -> list[tuple[Path, list[str]]]:
    groups: dict[Path, list[str]] = {}
    for path, caption in pairs:
        groups.setdefault(path, []).append(str(caption).strip())
    return list(groups.items())


def caption_csv(path: str | Path, images_root: str | Path | None = None, image_key: str = "filepath",
                caption_key: str = "title", sep: str = "\t", transform: Callable | None = None) -> CaptionFiles:
    """open_clip's CSV layout (``--csv-img-key filepath --csv-caption-key title``, tab-separated)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"caption CSV not found: {path}")
    root = Path(images_root) if images_root is not None else path.parent
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter=sep))
    if rows and (image_key not in rows[0] or caption_key not in rows[0]):
        raise ValueError(f"{path}: columns {image_key!r} and {caption_key!r} expected, found {sorted(rows[0])}")
    return CaptionFiles(_grouped((root / r[image_key], r[caption_key]) for r in rows), transform)


def coco_captions(annotations: str | Path, images_root: str | Path, transform: Callable | None = None) -> CaptionFiles:
    """The COCO captions JSON layout (``captions_train2017.json``): all captions of each image."""
    annotations = Path(annotations)
    if not annotations.is_file():
        raise DatasetNotFoundError(f"COCO caption annotations not found: {annotations}")
    data = json.loads(annotations.read_text())
    files = {im["id"]: Path(images_root) / im["file_name"] for im in data["images"]}
    pairs = sorted(((files[a["image_id"]], a["caption"]) for a in data["annotations"]), key=lambda p: str(p[0]))
    return CaptionFiles(_grouped(pairs), transform)


class TarCaptions(Dataset):
    """Webdataset tar shards as a map-style dataset (members grouped by key, read by byte offset)."""

    in_chans = 3
    num_classes = None
    classes = None

    def __init__(self, shards: Sequence[str | Path], transform: Callable | None = None):
        self.shards, self.transform = [str(s) for s in shards], transform
        if not self.shards:
            raise DatasetNotFoundError("no webdataset shards (*.tar) given")
        self.samples: list[tuple[int, tuple[int, int], list[str]]] = []
        for s, shard in enumerate(self.shards):
            groups: dict[str, dict] = {}
            with tarfile.open(shard) as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    g = groups.setdefault(key, {})
                    if "." + ext.lower() in IMAGE_EXTS:
                        g["image"] = (m.offset_data, m.size)
                    elif ext in ("txt", "json"):
                        raw = tar.extractfile(m).read().decode("utf-8")
                        g["captions"] = _parse_captions(raw, ext)
            self.samples += [(s, g["image"], g.get("captions") or []) for g in groups.values() if "image" in g]
        if not self.samples:
            raise DatasetNotFoundError(f"no image samples in {self.shards}")
        self.targets = [-1] * len(self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        shard, (offset, size), _ = self.samples[index]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            img = _as_image(read_image(f.read(size)))
        return (self.transform(img) if self.transform is not None else img), -1

    def captions(self, index: int) -> list[str]:
        return list(self.samples[index][2])


def _parse_captions(raw: str, ext: str) -> list[str]:
    if ext == "txt":
        return [line.strip() for line in raw.splitlines() if line.strip()]
    obj = json.loads(raw)
    caps = obj.get("captions", obj.get("caption", [])) if isinstance(obj, dict) else obj
    return [caps] if isinstance(caps, str) else [str(c) for c in caps]
