"""A run's train / test splits as its ``data`` config describes them, and the images evaluation reads.

    load_split(cfg, "train")   # the dataset, then: curated file list, first-N subset, long tail, captions
    eval_images(ds, size)      # in memory: (uint8 [N,C,size,size], labels); files: the dataset itself
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from .captions import TemplateCaptions
from .datasets import Forwarding, TensorImageDataset, in_memory
from .registry import build_dataset
from .subsets import long_tailed_indices, read_file_list
from .transforms import batch_resize_center_crop


def load_split(cfg, split: str, transform=None):
    """The ``split`` of ``cfg.data``; the training split with the subsets ``cfg.data`` asks for."""
    d = cfg.data
    kw = {"image_size": d.image_size} if d.name == "procedural" else {}  # generated at any size
    ds = build_dataset(d.name, split, root=d.root, download=d.download, transform=transform, **kw)
    if split == "train" and d.subset_file:  # a curated file list (visrep curate)
        names = [str(s[0]) for s in ds.samples] if hasattr(ds, "samples") else None
        ds = subset(ds, read_file_list(d.subset_file, names))
    if split == "train" and d.train_subset:
        ds = subset(ds, d.train_subset)
    if split == "train" and d.long_tail_ratio:
        if not in_memory(ds):
            raise ValueError("data.long_tail_ratio needs an in-memory dataset (fashion_mnist, cifar10, procedural)")
        idx = long_tailed_indices(ds.tensors()[1], d.long_tail_ratio, seed=cfg.train.seed, profile=d.long_tail_profile)
        ds = subset(ds, idx.tolist())
    if d.caption_templates:
        ds = TemplateCaptions(ds, d.caption_templates)
    return ds


def subset(ds, n: int | list[int]):
    """The first ``n`` items of ``ds``, or the items at the listed indices (in memory stays in memory)."""
    if in_memory(ds):
        images, labels = ds.tensors()
        idx = slice(0, n) if isinstance(n, int) else torch.as_tensor(n, dtype=torch.long)
        sub = TensorImageDataset(images[idx], labels[idx], transform=getattr(ds, "transform", None))
        for attr in ("num_classes", "classes"):
            if hasattr(ds, attr):
                setattr(sub, attr, getattr(ds, attr))
        return sub
    return FileSubset(ds, n)


class FileSubset(Forwarding, torch.utils.data.Subset):
    """The first ``n`` items (or the listed items) of a file dataset; forwards what the dataset tells
    (classes, channels, transform), selects ``targets`` and maps ``captions(i)`` through the indices."""

    forwarded = ("num_classes", "classes", "in_chans", "transform")

    def __init__(self, ds, n: int | list[int]):
        super().__init__(ds, range(min(n, len(ds))) if isinstance(n, int) else list(n))
        if hasattr(ds, "targets"):
            targets = list(ds.targets)
            self.targets = [targets[i] for i in self.indices]

    def __getattr__(self, name):
        if name == "captions" and hasattr(self.__dict__.get("dataset"), "captions"):
            return lambda i: self.dataset.captions(self.indices[i])
        return super().__getattr__(name)


def eval_images(ds, image_size: int):
    """What feature extraction iterates: ``(uint8 images, labels)`` for in-memory datasets, else the
    dataset itself (give it :func:`uint8_eval_transform`)."""
    if in_memory(ds):
        images, labels = ds.tensors()
        if images.shape[-1] != image_size or images.shape[-2] != image_size:
            images = (batch_resize_center_crop(images, image_size) * 255).round().clamp(0, 255).to(torch.uint8)
        return images, labels
    return ds, None


EVAL_CROP_PCT = 0.875   # 224 / 256: MSN logistic_eval / linear_eval, DINOv2 eval, I-JEPA's linear probe


def uint8_eval_transform(image_size: int, crop_pct: float = EVAL_CROP_PCT, interpolation: str = "bilinear"):
    """The papers' evaluation transform, to uint8 (methods normalise inside ``features``): shorter side
    resized to ``int(image_size / crop_pct)`` (224 -> 256), then a centre crop of ``image_size``;
    ``interpolation`` bilinear (MSN; DINOv2's own eval uses ``"bicubic"``). PIL images are resized by PIL
    as torchvision's ``Resize`` does in the official code, tensors with antialiasing. In-memory
    datasets do not come here (:func:`eval_images` resizes them to ``image_size`` directly)."""
    mode = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}[interpolation]
    return v2.Compose([_AsImage(), v2.Resize(int(image_size / crop_pct), interpolation=mode, antialias=True),
                       v2.CenterCrop(image_size), v2.ToImage()])


class _AsImage(torch.nn.Module):
    """PIL images and tensors as they are, anything else (numpy HWC) through ``v2.ToImage``."""

    def forward(self, img):
        from PIL import Image

        return img if isinstance(img, (Image.Image, torch.Tensor)) else v2.ToImage()(img)


def in_memory_split(cfg, split: str, purpose: str):
    """``(dataset, uint8 images, labels)`` of a split that must fit in memory (``purpose`` names who asks)."""
    ds = load_split(cfg, split, transform=uint8_eval_transform(cfg.data.image_size))
    images, labels = eval_images(ds, cfg.data.image_size)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{purpose} needs an in-memory {split} set")
    return ds, images, labels
