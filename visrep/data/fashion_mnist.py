"""The IDX array format (MNIST family) and Fashion-MNIST held in memory.

:func:`read_idx` reads one (optionally gzipped) IDX file, validating its header and size;
:func:`load_fashion_mnist` finds the four Fashion-MNIST files and returns a :class:`FashionMNIST`.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from . import datasets as _datasets
from .datasets import DatasetNotFoundError, TensorImageDataset, _normalise_split

__all__ = ["FASHION_MNIST_CLASSES", "IDXFormatError", "FashionMNIST", "read_idx", "load_fashion_mnist"]

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the expected array; the message names the file."""


# --------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------
_IDX_DTYPES = {
    0x08: (torch.uint8, "u1", 1),
    0x09: (torch.int8, "i1", 1),
    0x0B: (torch.int16, ">i2", 2),
    0x0C: (torch.int32, ">i4", 4),
    0x0D: (torch.float32, ">f4", 4),
    0x0E: (torch.float64, ">f8", 8),
}


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        # one-shot decompression: about twice as fast as streaming through gzip.open
        return gzip.decompress(data) if path.suffix == ".gz" else data
    except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise IDXFormatError(f"cannot read IDX file {path}: {type(e).__name__}: {e} "
                             "(truncated or corrupt download? delete it and fetch it again)") from e


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None,
             expected_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Read an IDX array file (optionally gzipped) into a tensor, validating magic number and size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"IDX file {path} is truncated: {len(data)} bytes, no header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(f"IDX file {path} has a bad magic number 0x{data[:4].hex()} "
                             "(not an IDX file, or corrupt)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(f"IDX file {path} has {ndim} dimensions, expected {expected_ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"IDX file {path} is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    tdtype, npdtype, itemsize = _IDX_DTYPES[code]
    if expected_dtype is not None and tdtype != expected_dtype:
        raise IDXFormatError(f"IDX file {path} holds {tdtype}, expected {expected_dtype}")
    expected = math.prod(dims) * itemsize
    got = len(data) - header
    if got != expected:
        kind = "truncated" if got < expected else "longer than its header says"
        raise IDXFormatError(f"IDX file {path} is {kind}: header says shape {tuple(dims)} "
                             f"({expected} bytes of data) but the file holds {got} bytes")
    if itemsize == 1:
        t = torch.frombuffer(bytearray(data), dtype=tdtype, offset=header, count=math.prod(dims))
    else:
        t = torch.from_numpy(np.frombuffer(data, dtype=npdtype, offset=header).astype(npdtype[1:]))
    return t.reshape(dims)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Where the files may sit under a root: the root itself, torchvision's layout, common names.
_SUBFOLDERS = ("FashionMNIST/raw", "fashion-mnist", "fashion_mnist", "raw")


def _find_file(folder: Path, stem: str) -> Path | None:
    # Prefer uncompressed files (faster); accept the "train-images.idx3-ubyte" spelling too.
    alt = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", alt, alt + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _fmnist_files_in(root: Path, split: str) -> tuple[Path, Path] | None:
    img_stem, lbl_stem = _FMNIST_FILES[split]
    for folder in (root, *(root / sub for sub in _SUBFOLDERS)):
        if not folder.is_dir():
            continue
        img, lbl = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
        if img is not None and lbl is not None:
            return img, lbl
    return None


def _load_fmnist_pair(img_path: Path, lbl_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(img_path, expected_ndim=3, expected_dtype=torch.uint8)
    labels = read_idx(lbl_path, expected_ndim=1, expected_dtype=torch.uint8)
    if tuple(images.shape[1:]) != (28, 28):
        raise IDXFormatError(f"IDX file {img_path} holds {tuple(images.shape[1:])} images, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{img_path} holds {images.shape[0]} images but {lbl_path} holds "
                             f"{labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= 10:
        raise IDXFormatError(f"IDX file {lbl_path} has label {int(labels.max())}, expected 0..9")
    return images.unsqueeze(1).contiguous(), labels.to(torch.int64)


def _download(dl_root: Path, split: str) -> tuple[Path, Path]:
    """Fetch the split with torchvision into ``dl_root``; raises whatever went wrong."""
    import torchvision

    torchvision.datasets.FashionMNIST(str(dl_root), train=(split == "train"), download=True)
    found = _fmnist_files_in(dl_root, split)
    if found is None:
        raise RuntimeError(f"download finished but no IDX files found under {dl_root}")
    return found


def _find_in_root(root: Path, split: str, download: bool) -> tuple[Path, Path]:
    """An explicit root must hold the data (or receive the download); no other place is tried."""
    found = _fmnist_files_in(root, split)
    if found is not None:
        return found
    looked = (f"{' and '.join(f + '[.gz]' for f in _FMNIST_FILES[split])} in {root}/ "
              f"(nor in its sub-folders {', '.join(s + '/' for s in _SUBFOLDERS)})")
    debian = (f"remove data.root / --data-root to use Debian's copy at {_datasets.DEBIAN_FASHION_MNIST_DIR}/ "
              f"(apt-get install {_datasets.DEBIAN_FASHION_MNIST_PACKAGE})")
    if download:
        try:
            return _download(root, split)
        except Exception as e:  # no internet, mirror down, ...
            raise DatasetNotFoundError(
                f"Fashion-MNIST ({split} split) not found under data.root / --data-root = {root}: looked for "
                f"{looked}, and data.download=true (torchvision into {root}) failed: {type(e).__name__}: {e}. "
                f"Fix: check the internet connection, put the files there, or {debian}."
            ) from e
    raise DatasetNotFoundError(
        f"Fashion-MNIST ({split} split) not found under data.root / --data-root = {root}: looked for {looked}. "
        f"Fix: point data.root at the folder holding these files, set data.download=true to fetch them into "
        f"{root} with torchvision (needs internet), or {debian}."
    )


def _find_default(split: str, download: bool) -> tuple[Path, Path]:
    """No root given: Debian's package path, then torchvision's download into the default root."""
    tried = ["  1. data.root / --data-root: not set"]
    debian = Path(_datasets.DEBIAN_FASHION_MNIST_DIR)
    package = _datasets.DEBIAN_FASHION_MNIST_PACKAGE
    found = _fmnist_files_in(debian, split)
    if found is not None:
        return found
    state = "files missing" if debian.is_dir() else "does not exist"
    tried.append(f"  2. Debian package path {debian}/ ({state}) -> install it with: apt-get install {package}")
    if download:
        dl_root = Path(_datasets.DEFAULT_DOWNLOAD_ROOT)
        try:
            return _download(dl_root, split)
        except Exception as e:  # no internet, mirror down, ...
            tried.append(f"  3. data.download=true (torchvision into {dl_root}) failed: {type(e).__name__}: {e}")
    else:
        tried.append("  3. download: disabled -> set data.download=true to fetch it with torchvision "
                     "(needs internet)")
    raise DatasetNotFoundError(
        f"Fashion-MNIST ({split} split) not found. Tried, in order:\n" + "\n".join(tried)
        + "\nFix one of them: pass --data-root / data.root=<folder with the IDX files>, "
          f"or apt-get install {package}, or set data.download=true."
    )


class FashionMNIST(TensorImageDataset):
    """Fashion-MNIST held in memory: ``images`` uint8 ``[N,1,28,28]``, ``labels`` int64 ``[N]``.

    ``source`` records the folder the files came from, ``load_seconds`` the load time.
    """

    def __init__(self, images, labels, transform=None, split="train", source: str | None = None,
                 load_seconds: float = 0.0):
        super().__init__(images, labels, transform=transform, classes=FASHION_MNIST_CLASSES,
                         name="fashion_mnist")
        self.split = split
        self.source = source
        self.load_seconds = load_seconds


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None,
                       transform: Callable | None = None, download: bool = False) -> FashionMNIST:
    """Load Fashion-MNIST into memory.

    With ``root`` (the folder holding the four IDX files, gzipped or not, or torchvision's
    ``<root>/FashionMNIST/raw`` layout) the data must be there, or ``download=True`` fetches it
    there with torchvision; nothing else is tried. Without ``root`` the look-up order is Debian's
    package path :data:`visrep.data.datasets.DEBIAN_FASHION_MNIST_DIR` (``apt-get install
    dataset-fashion-mnist``), then torchvision's download into
    :data:`visrep.data.datasets.DEFAULT_DOWNLOAD_ROOT` when ``download=True``.
    Raises :class:`~visrep.data.datasets.DatasetNotFoundError` naming everything tried.
    """
    split = _normalise_split(split)
    t0 = time.perf_counter()
    found = _find_in_root(Path(root), split, download) if root is not None else _find_default(split, download)
    images, labels = _load_fmnist_pair(*found)
    return FashionMNIST(images, labels, transform=transform, split=split, source=str(found[0].parent),
                        load_seconds=time.perf_counter() - t0)
