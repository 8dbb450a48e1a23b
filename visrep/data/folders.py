"""Image folders: :class:`SafeImageFolder` (``root/<class>/<image>``, unreadable files skipped)
and :func:`decode_image_rgb`, the decoder it uses.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import DatasetNotFoundError, _as_image

__all__ = ["UnreadableImageWarning", "SafeImageFolder", "decode_image_rgb"]


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def decode_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file into a ``uint8 [3,H,W]`` RGB tensor.

    PIL first (torchvision 0.29 deprecated its own image decoders), ``torchvision.io`` as the
    fallback for formats this PIL build cannot open. Raises ``ValueError`` when neither can.
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise ValueError("empty (zero-byte) file")
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    except Exception as pil_err:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from torchvision.io import ImageReadMode, decode_image, read_file

                return decode_image(read_file(path), mode=ImageReadMode.RGB)
        except Exception as tv_err:
            raise ValueError(f"PIL: {pil_err}; torchvision: {tv_err}") from pil_err


def _header_ok(path: str) -> None:
    """Cheap integrity check: non-empty and PIL can identify + verify the file."""
    if os.path.getsize(path) == 0:
        raise ValueError("empty (zero-byte) file")
    with Image.open(path) as im:
        im.verify()


class SafeImageFolder(Dataset):
    """ImageNet-layout folder ``root/<class>/<image>`` whose unreadable images are skipped.

    A file that fails to decode is reported with an :class:`UnreadableImageWarning` naming it, counted
    in ``num_skipped`` / ``skipped`` and replaced by the next readable sample (so a DataLoader never
    crashes mid-epoch). With ``verify=True`` (full decode) or ``verify="fast"`` (PIL header check)
    the folder is scanned up front and bad files are dropped, with a summary warning.

    Counts made inside DataLoader worker processes stay in those processes; use ``verify`` for an
    exact count.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 extensions: Sequence[str] | None = None, verify: bool | str = False,
                 loader: Callable[[str], torch.Tensor] | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise DatasetNotFoundError(f"image folder not found: data.root / --data-root = {self.root}")
        exts = tuple(e.lower() for e in (extensions or IMG_EXTENSIONS))
        self.classes, self.class_to_idx = find_classes(self.root)
        self.samples: list[tuple[str, int]] = make_dataset(self.root, self.class_to_idx, extensions=exts)
        if not self.samples:
            raise DatasetNotFoundError(f"no images with extensions {exts} under {self.root}")
        self.targets = [t for _, t in self.samples]
        self.transform = transform
        self.loader = loader or decode_image_rgb
        self.num_classes = len(self.classes)
        self.in_chans = 3
        self.image_size = None  # varies; resizing is the transform's job
        self.skipped: list[str] = []
        self._skipped_set: set[str] = set()
        self._bad: set[int] = set()
        if verify:
            self.verify(fast=(verify == "fast"))

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def _record_bad(self, index: int, err: Exception) -> None:
        path = self.samples[index][0]
        self._bad.add(index)
        if path not in self._skipped_set:
            self._skipped_set.add(path)
            self.skipped.append(path)
            warnings.warn(f"skipping unreadable image {path}: {err} "
                          f"({self.num_skipped} skipped so far in {self.root})",
                          UnreadableImageWarning, stacklevel=3)

    def verify(self, fast: bool = False) -> int:
        """Scan every file now, drop unreadable ones; returns how many were dropped."""
        good = []
        n0 = len(self.samples)
        for i, (path, target) in enumerate(self.samples):
            try:
                _header_ok(path) if fast else self.loader(path)
                good.append((path, target))
            except Exception as e:
                self._record_bad(i, e)
        dropped = n0 - len(good)
        self.samples = good
        self.targets = [t for _, t in good]
        self._bad = set()
        if dropped:
            warnings.warn(f"{self.root}: skipped {dropped} unreadable image(s) of {n0}; "
                          f"{len(good)} remain", UnreadableImageWarning, stacklevel=2)
        if not good:
            raise DatasetNotFoundError(f"no readable images under {self.root}")
        return dropped

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            path, target = self.samples[i]
            try:
                img = self.loader(path)
            except Exception as e:
                self._record_bad(i, e)
                continue
            img = _as_image(img)
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise RuntimeError(f"no readable image left in {self.root} ({self.num_skipped} skipped)")

    def __repr__(self) -> str:
        return (f"SafeImageFolder(root={self.root!r}, n={len(self)}, num_classes={self.num_classes}, "
                f"num_skipped={self.num_skipped})")
