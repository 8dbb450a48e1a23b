"""The geometry of a method's views, cut from the full-resolution image.

A method declares, per data stream, the kinds of views it takes (``StreamSpec.crops``):

    crops = {"global": CropSpec(224, count=2, scale=(0.32, 1.0), hflip=True),
             "local": CropSpec(96, count=8, scale=(0.05, 0.32), hflip=True)}

Each view is a RandomResizedCrop whose box is drawn on the whole image (the distribution of
torchvision's ``RandomResizedCrop.get_params``: area fraction ``scale`` of the full image, aspect ``ratio``), resized
to ``size`` and mirrored with probability 1/2 when ``hflip``, as the official transforms do. File
datasets cut them per sample in the DataLoader workers (:class:`CropViews`, uint8); in-memory datasets
cut the whole batch at once on the device (:func:`batch_crops`). ``prepare_batch`` gets both through
:func:`take_crops` (float [0, 1], ``[B, count, C, size, size]``) and runs the photometric ops batched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from .transforms import batch_random_resized_crop, sample_rrc_boxes_host


@dataclass(frozen=True)
class CropSpec:
    """``count`` random resized crops of ``scale`` x the full image's area, resized to ``size``."""

    size: int
    count: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = False


class CropViews:
    """Per-sample views (DataLoader workers): a uint8 ``[C, H, W]`` image -> ``{name: uint8 [count, C,
    size, size]}``. Boxes and flips come from ``generator`` (the loader seeds one per sample from
    ``(seed, epoch, index)``, so the views of a sample are the same whatever the worker, the process
    count or a resume), else from torch's global RNG."""

    def __init__(self, specs: dict[str, CropSpec]):
        self.specs = dict(specs)

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        image = torch.as_tensor(image)
        H, W = image.shape[-2:]
        if image.dim() == 3:  # channels-last: torch's vectorised uint8 antialiased resize (the same pixels),
            image = image.unsqueeze(0)  # worth the transpose from several views on
            if sum(s.count for s in self.specs.values()) > 1:
                image = image.contiguous(memory_format=torch.channels_last)
        out = {}
        for name, s in self.specs.items():
            boxes = sample_rrc_boxes_host(s.count, H, W, s.scale, s.ratio, generator)
            flips = (torch.rand(s.count, generator=generator) < 0.5).tolist() if s.hflip else [False] * s.count
            views = torch.empty(s.count, *image.shape[-3:-2], s.size, s.size, dtype=image.dtype)
            for j, ((x1, y1, x2, y2), flip) in enumerate(zip(boxes, flips)):
                v = TF.resized_crop(image, y1, x1, y2 - y1, x2 - x1, [s.size, s.size], antialias=True)
                views[j] = v.flip(-1) if flip else v
            out[name] = views
        return out

    def __repr__(self) -> str:
        return f"CropViews({self.specs})"


def batch_crops(images: Tensor, specs: dict[str, CropSpec], generator: torch.Generator) -> dict[str, Tensor]:
    """Every view of a batch of equal-size images at once: ``{name: float [B, count, C, size, size]}``
    in [0, 1] (view-major draws, the same distribution as :class:`CropViews`)."""
    B = images.shape[0]
    out = {}
    for name, s in specs.items():
        x = batch_random_resized_crop(images.repeat(s.count, 1, 1, 1), s.size, scale=s.scale, ratio=s.ratio,
                                      generator=generator, hflip=s.hflip)
        out[name] = x.view(s.count, B, *x.shape[1:]).transpose(0, 1)
    return out


def take_crops(batch: dict, specs: dict[str, CropSpec], generator: torch.Generator,
               as_float: bool = True) -> dict[str, Tensor]:
    """A batch's views as float [0, 1] ``[B, count, C, size, size]``: the workers' (``batch["crops"]``,
    file datasets) or cut here from the full images (``batch["image"]``, in-memory datasets).
    ``as_float=False`` leaves the workers' ``uint8`` views as they are (for
    :func:`visrep.data.views.photometric_views`, which converts them chunk by chunk)."""
    if "crops" in batch:
        return {k: v.float().div_(255.0) if as_float and not v.is_floating_point() else v
                for k, v in batch["crops"].items()}
    return batch_crops(batch["image"], specs, generator)


__all__ = ["CropSpec", "CropViews", "batch_crops", "take_crops"]
