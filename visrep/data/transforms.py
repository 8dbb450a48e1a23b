"""Image transforms: per-sample torchvision v2 pipelines and batched (whole-tensor) versions.

Per-sample pipelines (:func:`train_transform`, :func:`eval_transform`) take ``uint8`` CHW tensors
(or ``tv_tensors.Image`` / PIL) and return normalised ``float32`` tensors.

The batched versions (:func:`batch_random_resized_crop`, :func:`batch_resize_center_crop`,
:func:`batch_normalize`) work on a whole ``[B,C,H,W]`` batch with one ``roi_align`` (or
``grid_sample``) call and no Python loop over samples: the fast path for in-memory datasets on CPU
or GPU.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
    "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "PROCEDURAL_MEAN", "PROCEDURAL_STD",
    "DATASET_STATS", "dataset_stats", "TRAIN_KINDS", "train_transform", "eval_transform",
    "sample_rrc_boxes", "sample_rrc_boxes_host", "batch_random_resized_crop", "batch_normalize",
    "batch_resize_center_crop",
]

# Per-channel statistics of the training sets, images scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Measured on ProceduralShapes(seed=0, image_size=32) train split (mostly dark background).
PROCEDURAL_MEAN = (0.174, 0.171, 0.168)
PROCEDURAL_STD = (0.137, 0.123, 0.126)

# open_clip / OpenAI CLIP normalisation (the image-caption datasets)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DATASET_STATS = {
    "fashion_mnist": (FASHION_MNIST_MEAN, FASHION_MNIST_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD),
    "procedural": (PROCEDURAL_MEAN, PROCEDURAL_STD),
    "coco_captions": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "csv_captions": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "wds_captions": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def dataset_stats(name: str, in_chans: int | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` for a dataset name; ``in_chans`` adapts 3-channel stats to 1 channel and back."""
    key = str(name).lower().replace("-", "_")
    key = {"fmnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "shapes": "procedural"}.get(key, key)
    if key not in DATASET_STATS:
        raise KeyError(f"no statistics for dataset {name!r}; known: {sorted(DATASET_STATS)}")
    mean, std = DATASET_STATS[key]
    if in_chans is not None and in_chans != len(mean):
        if in_chans == 1:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        elif len(mean) == 1:
            mean, std = mean * in_chans, std * in_chans
        else:
            raise ValueError(f"cannot adapt {len(mean)}-channel stats to {in_chans} channels")
    return tuple(mean), tuple(std)


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return int(x[0]), int(x[1])
    return int(x), int(x)


# --------------------------------------------------------------------------------------------
# Per-sample pipelines (torchvision transforms v2)
# --------------------------------------------------------------------------------------------
TRAIN_KINDS = ("ijepa", "rrc", "simclr", "resize")
_DEFAULT_HFLIP = {"ijepa": False, "rrc": True, "simclr": True, "resize": False}


def train_transform(kind: str = "ijepa", image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD, crop_scale: tuple[float, float] = (0.3, 1.0),
                    hflip: bool | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    color_jitter: float = 0.4, in_chans: int | None = None, normalize: bool = True):
    """Training pipeline for ``uint8`` CHW images (float output; ``normalize=False``: in [0, 1]).

    kinds:
      * ``"ijepa"``: RandomResizedCrop(image_size, crop_scale) only, no photometric augmentation
        (I-JEPA); ``hflip`` defaults to False.
      * ``"rrc"``: RandomResizedCrop + horizontal flip (supervised / linear-probe style).
      * ``"simclr"``: RRC + flip + colour jitter (p=0.8) + grayscale (p=0.2) + Gaussian blur (p=0.5);
        colour jitter's saturation/hue and grayscale are skipped when ``in_chans == 1``.
      * ``"resize"``: no augmentation, resize + centre crop (like eval).
    ``hflip=None`` takes the kind's default.
    """
    from torchvision.transforms import v2

    if kind not in TRAIN_KINDS:
        raise ValueError(f"unknown train transform kind {kind!r}; choose from {TRAIN_KINDS}")
    if hflip is None:
        hflip = _DEFAULT_HFLIP[kind]
    size = _pair(image_size)
    ops: list = [v2.ToImage()]
    if kind == "resize":
        ops += [v2.Resize(min(size), antialias=True), v2.CenterCrop(size)]
    else:
        ops.append(v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=tuple(ratio), antialias=True))
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    if kind == "simclr":
        s = float(color_jitter)
        gray = in_chans == 1 or (in_chans is None and len(mean) == 1)
        if gray:
            ops.append(v2.RandomApply([v2.ColorJitter(brightness=s, contrast=s)], p=0.8))
        else:
            ops.append(v2.RandomApply([v2.ColorJitter(s, s, s, min(0.5, s / 4))], p=0.8))
            ops.append(v2.RandomGrayscale(p=0.2))
        k = max(3, int(0.1 * min(size)) // 2 * 2 + 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if normalize:
        ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)


def eval_transform(image_size: int = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, crop_pct: float = 1.0):
    """Evaluation pipeline: resize the short side to ``image_size / crop_pct``, centre-crop
    ``image_size``, scale to [0, 1] and normalise. ``crop_pct=0.875`` is the ImageNet convention
    (256 -> 224); the default 1.0 leaves square images at their native size untouched."""
    from torchvision.transforms import v2

    size = _pair(image_size)
    if not 0 < crop_pct <= 1:
        raise ValueError("crop_pct must be in (0, 1]")
    resize = int(math.floor(min(size) / crop_pct + 1e-6))
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


# --------------------------------------------------------------------------------------------
# Batched transforms
# --------------------------------------------------------------------------------------------
def sample_rrc_boxes(batch: int, height: int, width: int, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3),
                     generator: torch.Generator | None = None, attempts: int = 10) -> torch.Tensor:
    """RandomResizedCrop boxes for a batch, vectorised: ``int64 [B, 4]`` as ``(x1, y1, x2, y2)``.

    Same distribution as torchvision's RandomResizedCrop.get_params (``attempts`` tries per sample,
    first valid one kept, centre-crop fallback), drawn on the generator's device.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    B, H, W = int(batch), int(height), int(width)
    u = torch.rand(4, B, attempts, generator=generator, device=dev, dtype=torch.float64)
    return _rrc_boxes(u, H, W, scale, ratio)


def sample_rrc_boxes_host(count: int, height: int, width: int, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3),
                          generator: torch.Generator | None = None, attempts: int = 10) -> list[tuple[int, ...]]:
    """:func:`sample_rrc_boxes` for a few views of one image (a DataLoader worker): the same draws and
    float64 arithmetic, in Python (its 25 tiny tensor ops cost 0.16 ms per image), as a list of
    ``(x1, y1, x2, y2)``."""
    u = torch.rand(4, int(count), attempts, generator=generator, dtype=torch.float64)
    return _rrc_boxes_host(u.tolist(), int(height), int(width), scale, ratio).tolist()


def _rrc_boxes(u: torch.Tensor, H: int, W: int, scale, ratio) -> torch.Tensor:
    """:func:`sample_rrc_boxes` from its uniforms ``u`` (float64 ``[4, B, attempts]``), vectorised."""
    area = float(H * W)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_r0 + (log_r1 - log_r0) * u[1])
    # Values are non-negative, so int conversion (truncation) gives floor / round-half-up; this
    # also avoids torch.round/floor, which are pathologically slow on contended multi-thread CPUs.
    w = (torch.sqrt(target_area * aspect) + 0.5).to(torch.int64)
    h = (torch.sqrt(target_area / aspect) + 0.5).to(torch.int64)
    valid = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    y1 = torch.minimum((u[2].gather(1, first).squeeze(1) * (H - h + 1)).to(torch.int64), H - h)
    x1 = torch.minimum((u[3].gather(1, first).squeeze(1) * (W - w + 1)).to(torch.int64), W - w)
    fw, fh = _fallback_size(H, W, ratio)
    ok = valid.any(dim=1)
    w = torch.where(ok, w, torch.full_like(w, fw))
    h = torch.where(ok, h, torch.full_like(h, fh))
    x1 = torch.where(ok, x1, torch.full_like(x1, (W - fw) // 2))
    y1 = torch.where(ok, y1, torch.full_like(y1, (H - fh) // 2))
    return torch.stack([x1, y1, x1 + w, y1 + h], dim=1)


def _fallback_size(H: int, W: int, ratio) -> tuple[int, int]:
    """RandomResizedCrop's box when no attempt is valid: the centre crop with the aspect ratio clamped
    into ``ratio``, as ``(width, height)``."""
    in_ratio = W / H
    if in_ratio < min(ratio):
        return W, int(round(W / min(ratio)))
    if in_ratio > max(ratio):
        return int(round(H * max(ratio))), H
    return W, H


def _rrc_boxes_host(u: list, H: int, W: int, scale, ratio) -> torch.Tensor:
    """:func:`sample_rrc_boxes` from its uniforms ``u`` (``[4][B][attempts]`` floats), one sample at a time."""
    area = float(H * W)
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])
    fw, fh = _fallback_size(H, W, ratio)
    boxes = []
    for ua, ur, uy, ux in zip(*u):
        for a in range(len(ua)):
            target_area = area * (scale[0] + (scale[1] - scale[0]) * ua[a])
            aspect = math.exp(log_r0 + (log_r1 - log_r0) * ur[a])
            w = int(math.sqrt(target_area * aspect) + 0.5)
            h = int(math.sqrt(target_area / aspect) + 0.5)
            if 0 < w <= W and 0 < h <= H:
                y1, x1 = min(int(uy[a] * (H - h + 1)), H - h), min(int(ux[a] * (W - w + 1)), W - w)
                break
        else:  # no valid attempt: centre crop with the aspect ratio clamped into ``ratio``
            w, h, x1, y1 = fw, fh, (W - fw) // 2, (H - fh) // 2
        boxes.append((x1, y1, x1 + w, y1 + h))
    return torch.tensor(boxes, dtype=torch.int64).view(-1, 4)


def batch_normalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> torch.Tensor:
    """Scale uint8 to [0, 1] float (float input is taken as already in [0, 1]) and normalise."""
    if not x.is_floating_point():
        x = x.to(torch.float32).div_(255.0)
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def batch_random_resized_crop(images: torch.Tensor, out_size: int | tuple[int, int],
                              scale: tuple[float, float] = (0.3, 1.0),
                              ratio: tuple[float, float] = (3 / 4, 4 / 3),
                              generator: torch.Generator | None = None, hflip: bool = False,
                              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                              backend: str = "roi_align", return_boxes: bool = False):
    """RandomResizedCrop of a whole batch in one call: ``[B,C,H,W]`` (uint8 or float in [0,1]) ->
    ``float32 [B,C,out,out]`` in [0, 1] (or normalised with ``mean``/``std``).

    ``backend="roi_align"`` (default) averages several bilinear samples per output pixel when
    shrinking (anti-aliased, like torchvision's antialias=True resize), ``"grid_sample"`` takes one
    bilinear sample per pixel. A crop equal in size to the output reproduces its pixels exactly.
    With ``hflip`` each sample is mirrored with probability 1/2. ``return_boxes`` also returns the
    ``int64 [B,4]`` ``(x1,y1,x2,y2)`` crop boxes and the ``bool [B]`` flip flags.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be [B,C,H,W], got {tuple(images.shape)}")
    B, C, H, W = images.shape
    oh, ow = _pair(out_size)
    boxes = sample_rrc_boxes(B, H, W, scale, ratio, generator)
    dev = generator.device if generator is not None else torch.device("cpu")
    flips = (torch.rand(B, generator=generator, device=dev) < 0.5 if hflip
             else torch.zeros(B, dtype=torch.bool, device=dev))
    boxes_d = boxes.to(images.device)
    x = images.to(torch.float32) / 255.0 if not images.is_floating_point() else images.float()
    if B == 0:
        out = x.new_zeros(0, C, oh, ow)
    elif backend == "roi_align":
        from torchvision.ops import roi_align

        rois = torch.cat([torch.arange(B, device=x.device, dtype=x.dtype)[:, None], boxes_d.to(x.dtype)], dim=1)
        out = roi_align(x, rois, output_size=(oh, ow), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    elif backend == "grid_sample":
        b = boxes_d.to(x.dtype)
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        theta = torch.zeros(B, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = bw / W
        theta[:, 0, 2] = (2 * b[:, 0] + bw) / W - 1
        theta[:, 1, 1] = bh / H
        theta[:, 1, 2] = (2 * b[:, 1] + bh) / H - 1
        grid = F.affine_grid(theta, [B, C, oh, ow], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        raise ValueError(f"unknown backend {backend!r}: 'roi_align' or 'grid_sample'")
    if hflip:
        f = flips.to(out.device)[:, None, None, None]
        out = torch.where(f, out.flip(-1), out)
    out = batch_normalize(out, mean, std)
    if return_boxes:
        return out, boxes, flips
    return out


def batch_resize_center_crop(images: torch.Tensor, out_size: int | tuple[int, int],
                             crop_pct: float = 1.0) -> torch.Tensor:
    """Batched eval geometry: resize short side to ``out/crop_pct`` (anti-aliased), centre-crop."""
    oh, ow = _pair(out_size)
    x = images.to(torch.float32) / 255.0 if not images.is_floating_point() else images.float()
    H, W = x.shape[-2:]
    short = int(math.floor(min(oh, ow) / crop_pct + 1e-6))
    if min(H, W) != short:
        if H <= W:
            nh, nw = short, max(1, int(short * W / H))
        else:
            nh, nw = max(1, int(short * H / W)), short
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                          antialias=True).clamp_(0.0, 1.0)
        H, W = nh, nw
    if (H, W) != (oh, ow):
        top, left = int(round((H - oh) / 2.0)), int(round((W - ow) / 2.0))
        if top < 0 or left < 0:
            raise ValueError(f"cannot centre-crop {oh}x{ow} from {H}x{W}")
        x = x[..., top:top + oh, left:left + ow]
    return x
