"""Image folders: :class:`SafeImageFolder` (``root/<class>/<image>``, unreadable files skipped)
and :func:`decode_image_rgb`, the decoder it uses (:func:`pil_to_rgb`: 16-bit, palette, CMYK and
alpha images converted, 32-bit float ones refused by name); :func:`skipped_images`: the files a run
skipped, counted across DataLoader workers.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datasets import DatasetNotFoundError, _as_image

__all__ = ["ALPHA_BACKGROUND", "SkipReport", "UnreadableImageWarning", "SafeImageFolder", "decode_image_rgb",
           "pil_to_rgb", "skipped_images"]

# transparent pixels are composited onto this colour (what an image viewer shows on a white page);
# the official pipelines' ``convert("RGB")`` drops alpha instead, exposing whatever colour the
# transparent pixels hold
ALPHA_BACKGROUND = (255, 255, 255)



class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


class RefusedImageError(ValueError):
    """An image PIL can read but visrep does not convert (the message names its mode)."""


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """A PIL image as ``uint8 [H,W,3]`` RGB: 16-bit grey (``I;16*``, and ``I`` within 0..65535) scaled by
    255/65535 (``convert("RGB")`` clips it to black and white), palette / grey / CMYK (through its ICC
    profile when it has one) converted, alpha composited onto :data:`ALPHA_BACKGROUND`; 32-bit float
    (``F``) and out-of-range ``I`` images raise :class:`RefusedImageError`."""
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise RefusedImageError(f"32-bit integer image (mode {mode}) with values outside 0..65535: no known "
                                    "range to scale to 8 bits; convert it to an 8- or 16-bit image")
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        raise RefusedImageError("32-bit floating-point image (mode F): no known range to scale to 8 bits; "
                                "convert it to an 8- or 16-bit image")
    if mode == "CMYK" and im.info.get("icc_profile"):
        with contextlib.suppress(Exception):  # a broken profile: the plain conversion below
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
            return np.asarray(ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB"),
                              dtype=np.uint8)
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8)
    try:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise RefusedImageError(f"image mode {mode} cannot be converted to RGB ({e})") from e


def decode_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file into a ``uint8 [3,H,W]`` RGB tensor (:func:`pil_to_rgb`).

    PIL first (torchvision 0.29 deprecated its own image decoders), ``torchvision.io`` as the
    fallback for formats this PIL build cannot open. Raises ``ValueError`` when neither can, and
    :class:`RefusedImageError` for an image mode that has no RGB conversion.
    """
    path = os.fspath(path)
    if os.path.getsize(path) == 0:
        raise ValueError("empty (zero-byte) file")
    try:
        with Image.open(path) as im:
            arr = pil_to_rgb(im)
        # one writable copy; [3, H, W] as a view of the HWC pixels (channels-last strides): the views are cut
        # from it without a transpose (CropViews resizes channels-last)
        return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)
    except RefusedImageError:
        raise
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

    Each process warns once per file it skips; every process (DataLoader workers included) also
    appends the path to one shared list file, so :meth:`skipped_all` (and the trainer's end-of-run
    summary, :func:`skipped_images`) counts the run's skipped files across workers.
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
        self._listed = len(self.samples)  # files found, before any was skipped
        self.transform = transform
        self.loader = loader or decode_image_rgb
        self.num_classes = len(self.classes)
        self.in_chans = 3
        self.image_size = None  # varies; resizing is the transform's job
        self.skipped: list[str] = []
        self._skipped_set: set[str] = set()
        self._bad: set[int] = set()
        fd, self._skip_log = tempfile.mkstemp(prefix="visrep-skipped-", suffix=".txt")
        os.close(fd)
        weakref.finalize(self, _remove_if_owner, self._skip_log, os.getpid())
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
            with contextlib.suppress(OSError):  # one short O_APPEND write: whole lines from every worker
                with open(self._skip_log, "a") as f:
                    f.write(path.replace("\n", " ") + "\n")
            warnings.warn(f"skipping unreadable image {path}: {err} (the run's summary counts them all)",
                          UnreadableImageWarning, stacklevel=3)

    def skipped_all(self) -> list[str]:
        """The files skipped so far by this process and by every DataLoader worker, sorted."""
        found = set(self.skipped)
        with contextlib.suppress(OSError):
            with open(self._skip_log) as f:
                found.update(line.rstrip("\n") for line in f if line.strip())
        return sorted(found)

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


def _remove_if_owner(path: str, pid: int) -> None:
    if os.getpid() == pid:
        with contextlib.suppress(OSError):
            os.unlink(path)


@dataclass
class SkipReport:
    """The files a dataset skipped (``paths``, sorted), of ``total`` listed under ``root``."""

    root: str = ""
    total: int = 0
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def skipped_images(ds, _depth: int = 0) -> SkipReport:
    """What the :class:`SafeImageFolder` inside ``ds`` (itself, or wrapped by subsets: ``.dataset`` /
    ``.data``) skipped, in every process of this machine's run; gathered over ranks when distributed
    (a collective: call it on every rank). Empty when there is no such folder."""
    from visrep import distributed as D

    report = SkipReport()
    node = ds
    for _ in range(6):
        if isinstance(node, SafeImageFolder):
            report = SkipReport(node.root, getattr(node, "_listed", len(node.samples)), node.skipped_all())
            break
        node = getattr(node, "dataset", None) or getattr(node, "data", None)
        if node is None:
            break
    if D.is_distributed():
        gathered = D.all_gather_object(report.paths)
        report.paths = sorted({p for paths in gathered for p in paths})
    return report
