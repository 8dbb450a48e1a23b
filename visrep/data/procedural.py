"""Procedural shapes: images generated from ``(seed, split, index)``, no files, no memory.

:class:`ProceduralShapes` draws coloured, textured shapes; the attribute vocabularies
(:data:`SHAPES`, :data:`COLOURS`, :data:`SIZES`, :data:`POSITIONS`, :data:`TEXTURES`) are module constants.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from visrep.utils import mix_seed

from .datasets import InMemory, _as_image, _normalise_split

__all__ = ["SHAPES", "COLOURS", "SIZES", "POSITIONS", "TEXTURES", "ProceduralShapes"]

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


class ProceduralShapes(InMemory, Dataset):
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

    @property
    def templates(self) -> tuple[str, ...]:
        """Zero-shot prompt templates for the label attribute, in the captions' own phrasing (for
        attributes other than the shape: one template per shape, an ensemble)."""
        if self.label_attr == "shape":
            return ("a {}", "a picture of a {}")
        if self.label_attr == "position":
            return tuple(f"a picture of a {s} at the {{}}" for s in self.shapes)
        return tuple(f"a {{}} {s}" for s in self.shapes)

    def label_of(self, attrs: dict[str, Any]) -> int:
        key = "colour" if self.label_attr == "color" else self.label_attr
        return self.classes.index(attrs[key])

    def captions(self, index: int) -> list[str]:
        a = self.attributes(index)
        shape, size, pos, tex = a["shape"], a["size"], a["position"], a["texture"]
        where = ("in the center" if pos == "center"
                 else f"on the {pos}" if pos in ("left", "right") else f"at the {pos}")
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
