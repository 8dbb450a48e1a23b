"""Datasets: Fashion-MNIST, CIFAR-10/100, ImageFolder and a procedural (generated) dataset.

Every dataset yields ``(image, label)`` where ``image`` is a ``uint8`` CHW tensor (a
``torchvision.tv_tensors.Image``) before ``transform``, so torchvision transforms v2 apply directly.
Each dataset exposes ``num_classes``, ``in_chans``, ``image_size`` (native side, ``None`` when it
varies) and ``classes`` when known.

In-memory datasets (Fashion-MNIST, CIFAR) also offer ``tensors() -> (images [N,C,H,W] uint8, labels
[N] int64)``, the fast path used by :class:`visrep.data.loaders.InMemoryBatches`.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

from visrep.utils import mix_seed
import torch
from torch.utils.data import Dataset

try:  # torchvision >= 0.16
    from torchvision import tv_tensors as _tv_tensors
except ImportError:  # pragma: no cover - very old torchvision
    _tv_tensors = None

__all__ = [
    "DEBIAN_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "DatasetNotFoundError",
    "IDXFormatError",
    "UnreadableImageWarning",
    "TensorImageDataset",
    "FashionMNIST",
    "SafeImageFolder",
    "ProceduralShapes",
    "read_idx",
    "load_fashion_mnist",
    "build_dataset",
    "DATASET_NAMES",
]

# Where Debian's ``dataset-fashion-mnist`` package installs the four gzipped IDX files.
# A module-level constant so tests (and unusual systems) can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# Default download root when ``download=True`` and no root was given.
DEFAULT_DOWNLOAD_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "visrep", "data")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "imagefolder", "procedural")
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
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files could not be found (or fetched); the message lists every option tried."""


class IDXFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the expected array; the message names the file."""


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was skipped."""


def _as_image(x: torch.Tensor) -> torch.Tensor:
    return _tv_tensors.Image(x) if _tv_tensors is not None else x


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
# IDX files (MNIST / Fashion-MNIST)
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
        import numpy as np

        t = torch.from_numpy(np.frombuffer(data, dtype=npdtype, offset=header).astype(npdtype[1:]))
    return t.reshape(dims)


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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
    for folder in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist", root / "fashion_mnist",
                   root / "raw"):
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

    Look-up order: (1) the explicit ``root`` (the folder holding the four IDX files, gzipped or
    not, or torchvision's ``<root>/FashionMNIST/raw`` layout); (2) Debian's package path
    :data:`DEBIAN_FASHION_MNIST_DIR` (``apt-get install dataset-fashion-mnist``); (3) torchvision's
    download when ``download=True`` (into ``root`` or :data:`DEFAULT_DOWNLOAD_ROOT`).
    Raises :class:`DatasetNotFoundError` naming all three when none works.
    """
    split = _normalise_split(split)
    t0 = time.perf_counter()
    tried: list[str] = []
    found = None
    if root is not None:
        found = _fmnist_files_in(Path(root), split)
        if found is None:
            tried.append(f"  1. data.root / --data-root: {os.fspath(root)} -> no {'/'.join(_FMNIST_FILES[split])}"
                         "[.gz] there (nor in FashionMNIST/raw/)")
    else:
        tried.append("  1. data.root / --data-root: not set")
    debian = Path(DEBIAN_FASHION_MNIST_DIR)
    if found is None:
        found = _fmnist_files_in(debian, split)
        if found is None:
            state = "files missing" if debian.is_dir() else "does not exist"
            tried.append(f"  2. Debian package path {debian}/ ({state}) -> install it with: "
                         f"apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}")
    if found is None:
        if download:
            dl_root = Path(root) if root is not None else Path(DEFAULT_DOWNLOAD_ROOT)
            try:
                import torchvision

                torchvision.datasets.FashionMNIST(str(dl_root), train=(split == "train"), download=True)
                found = _fmnist_files_in(dl_root, split)
                if found is None:
                    raise RuntimeError(f"download finished but no IDX files found under {dl_root}")
            except Exception as e:  # no internet, mirror down, ...
                tried.append(f"  3. data.download=true (torchvision into {dl_root}) failed: "
                             f"{type(e).__name__}: {e}")
        else:
            tried.append("  3. download: disabled -> set data.download=true to fetch it with torchvision "
                         "(needs internet)")
    if found is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST ({split} split) not found. Tried, in order:\n" + "\n".join(tried)
            + "\nFix one of them: pass --data-root / data.root=<folder with the IDX files>, "
              f"or apt-get install {DEBIAN_FASHION_MNIST_PACKAGE}, or set data.download=true."
        )
    images, labels = _load_fmnist_pair(*found)
    return FashionMNIST(images, labels, transform=transform, split=split, source=str(found[0].parent),
                        load_seconds=time.perf_counter() - t0)


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
# ImageFolder that skips unreadable images
# --------------------------------------------------------------------------------------------
def decode_image_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file into a ``uint8 [3,H,W]`` RGB tensor.

    PIL first (torchvision 0.29 deprecated its own image decoders), ``torchvision.io`` as the
    fallback for formats this PIL build cannot open. Raises ``ValueError`` when neither can.
    """
    import numpy as np
    from PIL import Image

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
    from PIL import Image

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


# --------------------------------------------------------------------------------------------
# Procedural shapes: deterministic, generated from (seed, index), no files, no memory
# --------------------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "magenta": (0.90, 0.20, 0.85),
    "cyan": (0.15, 0.85, 0.90),
    "orange": (0.95, 0.55, 0.10),
    "white": (0.95, 0.95, 0.95),
}
SIZES = {"small": 0.12, "medium": 0.17, "large": 0.23}  # radius as a fraction of the image side
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
TEXTURES = ("solid", "striped", "checkered")
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003}





class ProceduralShapes(Dataset):
    """Generated images of coloured, textured shapes; ``label`` = shape class (or another attribute).

    Each item is rendered on the fly from ``(seed, split, index)`` so the dataset costs no memory
    and is bit-exactly reproducible. ``attributes(i)`` gives shape/colour/size/position/texture and
    ``captions(i)`` several true sentences ("a small red circle at the top left", ...).
    """

    def __init__(self, num_samples: int | None = None, image_size: int = 32, in_chans: int = 3,
                 split: str = "train", seed: int = 0, transform: Callable | None = None,
                 shapes: Sequence[str] = SHAPES, label: str = "shape", noise: float = 0.04):
        split = _normalise_split(split)
        if num_samples is None:
            num_samples = 2000 if split == "train" else 500
        if in_chans not in (1, 3):
            raise ValueError("in_chans must be 1 or 3")
        if image_size < 8:
            raise ValueError("image_size must be >= 8")
        unknown = set(shapes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shapes {sorted(unknown)}; choose from {SHAPES}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.in_chans = int(in_chans)
        self.split = split
        self.seed = int(seed)
        self.transform = transform
        self.shapes = tuple(shapes)
        self.noise = float(noise)
        self.label_attr = label
        self._label_values = {
            "shape": list(self.shapes), "colour": list(COLOURS), "color": list(COLOURS),
            "size": list(SIZES), "position": list(POSITIONS), "texture": list(TEXTURES),
        }
        if label not in self._label_values:
            raise ValueError(f"label must be one of {sorted(self._label_values)}")
        self.classes = self._label_values[label]
        self.num_classes = len(self.classes)
        s = torch.arange(self.image_size, dtype=torch.float32) + 0.5
        self._yy, self._xx = torch.meshgrid(s, s, indexing="ij")

    def __len__(self) -> int:
        return self.num_samples

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, _SPLIT_OFFSET[self.split], index))

    def attributes(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        g = self._generator(index)
        r = torch.randint(0, 1 << 30, (6,), generator=g).tolist()
        f = torch.rand(6, generator=g).tolist()
        return {
            "shape": self.shapes[r[0] % len(self.shapes)],
            "colour": list(COLOURS)[r[1] % len(COLOURS)],
            "size": list(SIZES)[r[2] % len(SIZES)],
            "position": POSITIONS[r[3] % len(POSITIONS)],
            "texture": TEXTURES[r[4] % len(TEXTURES)],
            "background": 0.05 + 0.2 * f[0],
            "jitter": (f[1] - 0.5, f[2] - 0.5),
            "brightness": 0.75 + 0.25 * f[3],
            "noise_seed": r[5],
            "texture_phase": f[4],
        }

    def label_of(self, attrs: dict[str, Any]) -> int:
        key = "colour" if self.label_attr == "color" else self.label_attr
        return self.classes.index(attrs[key])

    def captions(self, index: int) -> list[str]:
        a = self.attributes(index)
        shape, size, pos, tex = a["shape"], a["size"], a["position"], a["texture"]
        where = "in the center" if pos == "center" else (f"on the {pos}" if pos in ("left", "right") else f"at the {pos}")
        art = "an" if tex[0] in "aeiou" else "a"
        caps = [f"a {size} {shape} {where}", f"a {tex} {shape}", f"{art} {tex} {size} {shape}",
                f"a picture of a {shape} {where}"]
        if self.in_chans == 3:
            col = a["colour"]
            caps = [f"a {size} {col} {shape} {where}", f"a {col} {shape}"] + caps
        return caps

    def render(self, attrs: dict[str, Any] | Sequence[dict[str, Any]]) -> torch.Tensor:
        """Draw one image (``uint8 [C,S,S]``) or, given a list of attribute dicts, a batch
        (``uint8 [N,C,S,S]``) in one vectorised pass."""
        single = isinstance(attrs, dict)
        batch = [attrs] if single else list(attrs)
        N, S, C = len(batch), self.image_size, self.in_chans
        f = lambda vals: torch.tensor(vals, dtype=torch.float32).view(N, 1, 1)  # noqa: E731
        rows, cols = zip(*(divmod(POSITIONS.index(a["position"]), 3) for a in batch))
        cx = S * (0.25 + 0.25 * f(cols) + 0.06 * f([a["jitter"][0] for a in batch]))
        cy = S * (0.25 + 0.25 * f(rows) + 0.06 * f([a["jitter"][1] for a in batch]))
        r = S * f([SIZES[a["size"]] for a in batch])
        xx, yy = self._xx.unsqueeze(0), self._yy.unsqueeze(0)
        dx, dy = xx - cx, yy - cy
        adx, ady = dx.abs(), dy.abs()
        d2 = dx * dx + dy * dy
        masks = {  # evaluated only for the shapes present
            "circle": lambda: d2 <= r * r,
            "square": lambda: torch.maximum(adx, ady) <= 0.85 * r,
            "triangle": lambda: (dy <= 0.8 * r) & (adx <= (dy + r) * 0.61),
            "diamond": lambda: adx + ady <= 1.1 * r,
            "cross": lambda: ((adx <= r / 3) & (ady <= r)) | ((ady <= r / 3) & (adx <= r)),
            "ring": lambda: (d2 <= r * r) & (d2 >= 0.3 * r * r),
        }
        mask = torch.zeros(N, S, S, dtype=torch.bool)
        for name in {a["shape"] for a in batch}:
            sel = torch.tensor([a["shape"] == name for a in batch]).view(N, 1, 1)
            mask |= sel & masks[name]()
        period = max(2.0, S / 8)
        phase = f([a["texture_phase"] for a in batch]) * period
        # positive coordinates: int conversion is floor (torch.floor is slow on contended CPUs)
        tex = [a["texture"] for a in batch]
        pattern = torch.ones_like(mask)
        if "striped" in tex:
            stripes = ((xx + yy + phase) / period).to(torch.int64) % 2 == 0
            pattern = torch.where(torch.tensor([t == "striped" for t in tex]).view(N, 1, 1), stripes, pattern)
        if "checkered" in tex:
            checks = (((xx + phase) / period).to(torch.int64) + ((yy + phase) / period).to(torch.int64)) % 2 == 0
            pattern = torch.where(torch.tensor([t == "checkered" for t in tex]).view(N, 1, 1), checks, pattern)
        shade = torch.where(pattern, 1.0, 0.45) * f([a["brightness"] for a in batch])
        colour = torch.tensor([COLOURS[a["colour"]] for a in batch])  # [N, 3]
        if C == 1:
            colour = (colour @ torch.tensor([0.299, 0.587, 0.114])).clamp(min=0.6).unsqueeze(1)
        noise = torch.stack([torch.randn(C, S, S, generator=torch.Generator().manual_seed(a["noise_seed"]))
                             for a in batch])
        bg = f([a["background"] for a in batch]).unsqueeze(1) + self.noise * noise
        fg = colour.view(N, C, 1, 1) * shade.unsqueeze(1)
        img = torch.where(mask.unsqueeze(1), fg, bg)
        out = (img.clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        return out[0] if single else out

    def __getitem__(self, index: int):
        if index < 0:
            index += self.num_samples
        attrs = self.attributes(index)
        img = _as_image(self.render(attrs))
        if self.transform is not None:
            img = self.transform(img)
        return img, self.label_of(attrs)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Render everything into ``(uint8 [N,C,S,S], int64 [N])`` (for small N: tests, demos)."""
        S, chunk = self.image_size, 512
        imgs = torch.empty(self.num_samples, self.in_chans, S, S, dtype=torch.uint8)
        labels = torch.empty(self.num_samples, dtype=torch.int64)
        for start in range(0, self.num_samples, chunk):
            attrs = [self.attributes(i) for i in range(start, min(start + chunk, self.num_samples))]
            imgs[start:start + len(attrs)] = self.render(attrs)
            labels[start:start + len(attrs)] = torch.tensor([self.label_of(a) for a in attrs])
        return imgs, labels

    def __repr__(self) -> str:
        return (f"ProceduralShapes(n={self.num_samples}, image_size={self.image_size}, in_chans={self.in_chans}, "
                f"split={self.split!r}, seed={self.seed}, label={self.label_attr!r})")


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def build_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                  transform: Callable | None = None, download: bool = False, **kw) -> Dataset:
    """Build a dataset by name: fashion_mnist, cifar10, cifar100, imagefolder or procedural.

    Extra keywords go to the dataset: imagefolder takes ``verify``/``extensions`` (and picks
    ``root/<split>`` when that folder exists, ``split`` "val"/"test" trying both names);
    procedural takes ``num_samples``, ``image_size``, ``in_chans``, ``seed``, ``shapes``, ``label``.
    """
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
