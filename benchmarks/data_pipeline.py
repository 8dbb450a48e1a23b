"""Data-pipeline throughput per worker core: decode + views, ours against the official transform pipelines.

On a generated folder of full-resolution JPEGs (500x375 and 375x500, smooth random content plus noise,
quality 90), one process with one thread (``torch.set_num_threads(1)``) does, per batch of images:

* **ours**: what a DataLoader worker does (:class:`visrep.data.streams.DictDataset`: decode with
  :func:`visrep.data.folders.decode_image_rgb`, the method's views cut from the full image by
  :class:`visrep.data.crops.CropViews`, :func:`collate_dicts`), then the method's ``prepare_batch`` on the
  CPU (batched photometric ops and normalisation, plus DINOv2's iBOT masks, I-JEPA's block masks, MSN's
  patch-drop permutation, CLIP's tokenisation), attributed per image;
* **official**: PIL decode as torchvision's ImageFolder (``Image.open(...).convert("RGB")``), the official
  transform object applied per image, then the official collate (DINOv2 ``collate_data_and_cast`` with its
  ``MaskingGenerator``, I-JEPA's multiblock ``MaskCollator``, open_clip's tokenizer per caption, else
  ``default_collate``). The official code is imported from checkouts given on the command line.

Methods are built from their ImageNet recipes (visrep/configs/<method>/...) with a tiny model (not timed),
so the views are the recipes': DINOv2 2x224 + 8x98 (ViT-L/14 recipe), MSN 2x224 + 10x96, PAWS 2x224 +
6x96 (unlabelled stream; the support stream is left out on both sides), I-JEPA 1x224, CLIP 1x224.
Sides and methods are interleaved in rounds (the order of the two sides alternates per round); the
rate is images per CPU-second of this process (robust to other load on the machine), wall-clock rates
beside it; "loader workers only" counts our decode + views + collate alone (on a GPU machine
``prepare_batch`` runs on the device, so that is what a worker core does). Usage::

    python benchmarks/data_pipeline.py --dinov2 /tmp/dinov2 --msn /tmp/msn --suncet /tmp/suncet \
        --ijepa /tmp/ijepa [--images 200] [--batch 32] [--rounds 3] [--methods msn dinov2 ...]
"""
from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `import visrep` does (before torch: read once); both sides

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visrep.config import load_config  # noqa: E402
from visrep.data.folders import SafeImageFolder  # noqa: E402
from visrep.data.streams import DictDataset, collate_dicts  # noqa: E402
from visrep.data.transforms import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402
from visrep.methods import build_method  # noqa: E402
from visrep.methods.base import DataInfo  # noqa: E402

TINY_VIT = ["model.embed_dim=32", "model.depth=1", "model.num_heads=1"]
RECIPES = {  # method: (recipe, overrides making the model tiny: the views stay the recipe's)
    "dinov2": ("dinov2/imagenet_vit_l14", TINY_VIT + [f"method.{k}=16" for k in (
        "head_n_prototypes", "ibot_n_prototypes", "head_hidden_dim", "ibot_hidden_dim", "head_bottleneck_dim",
        "ibot_bottleneck_dim")]),
    "msn": ("msn/imagenet_vit_s16", TINY_VIT + ["method.num_prototypes=16", "method.hidden_dim=16",
                                                 "method.output_dim=16"]),
    "paws": ("paws/imagenet_resnet50", ["method.backbone=resnet18", "method.hidden_dim=16", "method.output_dim=16"]),
    "ijepa": ("ijepa/imagenet_vit_h14", TINY_VIT + ["method.pred_depth=1", "method.pred_emb_dim=16"]),
    "clip": ("clip/metaclip_vit_b16", TINY_VIT + ["method.text_width=16", "method.text_depth=1",
                                                   "method.text_heads=1", "method.embed_dim=16"]),
}
CAPTION = "a photo of a smooth random image"


# -- the image folder --------------------------------------------------------------------------------
def make_folder(root: Path, n: int, seed: int = 0, quality: int = 90) -> None:
    """``n`` JPEGs in ``root/{a,b}/``, alternately 500x375 and 375x500 (W x H): smooth random colour fields
    (bicubic upsampling of an 8x6 grid) with mild pixel noise, so that they compress like photographs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in "ab":
        (root / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = (500, 375) if i % 2 == 0 else (375, 500)
        grid = rng.integers(0, 256, (6, 8, 3) if w > h else (8, 6, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "ab"[i % 2] / f"{i:05d}.jpg", quality=quality)


# -- the official pipelines ----------------------------------------------------------------------------
def load_module(path: Path, name: str):
    """Import one file of a checkout under a unique name (MSN's and PAWS's are both ``src.data_manager``)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if hasattr(mod, "ImageFilter"):  # their GaussianBlur passes a 1-element tensor radius, which PIL >= 10 refuses
        mod.ImageFilter = _PILFilterShim
    return mod


class _PILFilterShim:
    """``PIL.ImageFilter`` for the official modules, the blur radius as a float (same blur)."""

    @staticmethod
    def GaussianBlur(radius):  # noqa: N802 (PIL's name)
        from PIL import ImageFilter

        return ImageFilter.GaussianBlur(radius=float(radius))


def pil_loader(path: str):
    """torchvision's ImageFolder loader (``datasets.folder.pil_loader``)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


@dataclass
class Official:
    per_image: Callable  # PIL image -> the sample (views [+ target])
    collate: Callable


def official_pipeline(name: str, method, args) -> Official:
    from torch.utils.data import default_collate

    m = method.cfg
    if name == "dinov2":
        sys.path.insert(0, str(args.dinov2))
        from dinov2.data.augmentations import DataAugmentationDINO
        from dinov2.data.collate import collate_data_and_cast
        from dinov2.data.masking import MaskingGenerator

        crops = method.streams()["main"].crops
        g, loc = crops["global_crops"], crops["local_crops"]
        aug = DataAugmentationDINO(g.scale, loc.scale, loc.count, global_crops_size=g.size, local_crops_size=loc.size)
        grid = g.size // method.run_cfg.model.patch_size
        mask_gen = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
        return Official(lambda img: (aug(img), 0), partial(
            collate_data_and_cast, mask_ratio_tuple=tuple(m.mask_ratio), mask_probability=m.mask_probability,
            dtype=torch.float32, n_tokens=grid * grid, mask_generator=mask_gen))
    if name == "msn":
        dm = load_module(args.msn / "src" / "data_manager.py", "official_msn_data_manager")
        t = dm.make_transforms(rand_size=m.rand_size, focal_size=m.focal_size, rand_crop_scale=tuple(m.rand_crop_scale),
                               focal_crop_scale=tuple(m.focal_crop_scale), color_jitter=m.color_jitter,
                               rand_views=m.rand_views + 1, focal_views=m.focal_views)  # as msn_train.py
        return Official(lambda img: (t(img), 0), default_collate)
    if name == "paws":
        dm = load_module(args.suncet / "src" / "data_manager.py", "official_suncet_data_manager")
        t, _ = dm.make_transforms("imagenet", training=True, crop_scale=tuple(m.crop_scale),
                                  color_jitter=m.color_jitter, normalize=True)
        k, mc = dm.make_multicrop_transform("imagenet", m.multicrop, m.mc_size, tuple(m.mc_scale), True,
                                            m.color_jitter)
        # TransImageNet.__getitem__ (unsupervised): two large views, then the multicrop views
        return Official(lambda img: (t(img), t(img), *[mc(img) for _ in range(k)], 0), default_collate)
    if name == "ijepa":
        tr = load_module(args.ijepa / "src" / "transforms.py", "official_ijepa_transforms")
        mb = load_module(args.ijepa / "src" / "masks" / "multiblock.py", "official_ijepa_multiblock")
        t = tr.make_transforms(crop_size=method.image_size, crop_scale=tuple(m.crop_scale), horizontal_flip=False,
                               color_distortion=False, gaussian_blur=False)
        coll = mb.MaskCollator(input_size=method.image_size, patch_size=method.run_cfg.model.patch_size,
                               pred_mask_scale=tuple(m.pred_mask_scale), enc_mask_scale=tuple(m.enc_mask_scale),
                               aspect_ratio=tuple(m.aspect_ratio), nenc=m.num_enc_masks, npred=m.num_pred_masks,
                               allow_overlap=False, min_keep=m.min_keep)
        return Official(lambda img: (t(img), 0), coll)
    if name == "clip":
        import open_clip

        t = open_clip.image_transform(method.image_size, is_train=True, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
        return Official(lambda img: (t(img), open_clip.tokenize([CAPTION])[0]), default_collate)
    raise KeyError(name)


# -- ours ------------------------------------------------------------------------------------------------
def build(name: str):
    recipe, overrides = RECIPES[name]
    cfg = load_config(recipe, overrides)
    mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if name == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    torch.manual_seed(0)
    method = build_method(cfg, DataInfo(3, cfg.data.image_size, 2, mean, std))
    method.run_cfg = cfg
    return method


def empty_supports(method) -> dict:
    """PAWS's support stream, empty: only the unlabelled stream is timed (as on the official side)."""
    crops = method.streams()["supports"].crops
    return {"label": torch.zeros(0, dtype=torch.long), "index": torch.zeros(0, dtype=torch.long),
            "crops": {k: torch.zeros(0, s.count, 3, s.size, s.size, dtype=torch.uint8) for k, s in crops.items()}}


@dataclass
class Side:
    cpu: float = 0.0
    wall: float = 0.0
    images: int = 0
    parts: dict = field(default_factory=dict)  # part -> cpu seconds

    def rate(self, wall: bool = False) -> float:
        return self.images / max(self.wall if wall else self.cpu, 1e-9)


def run_ours(name: str, method, ds: DictDataset, idx: list[int], epoch: int, side: Side) -> None:
    c0, w0 = time.process_time(), time.perf_counter()
    batch = collate_dicts([ds[(i, epoch)] for i in idx])
    c1 = time.process_time()
    if name == "clip":
        batch["caption"] = [[CAPTION]] * len(idx)
    if name == "paws":
        batch["supports"] = empty_supports(method)
    g = torch.Generator().manual_seed(epoch)
    method.prepare_batch(batch, g)
    c2, w2 = time.process_time(), time.perf_counter()
    side.cpu += c2 - c0
    side.wall += w2 - w0
    side.images += len(idx)
    side.parts["worker"] = side.parts.get("worker", 0.0) + c1 - c0
    side.parts["prepare_batch"] = side.parts.get("prepare_batch", 0.0) + c2 - c1


def run_official(off: Official, paths: list[str], side: Side) -> None:
    c0, w0 = time.process_time(), time.perf_counter()
    off.collate([off.per_image(pil_loader(p)) for p in paths])
    c1, w1 = time.process_time(), time.perf_counter()
    side.cpu += c1 - c0
    side.wall += w1 - w0
    side.images += len(paths)


def run_decode(paths: list[str], side: Side) -> None:
    """PIL decode alone (as the official loader): what any pipeline that decodes the full image pays per
    image, so ``official / decode`` bounds the ratio a faster pipeline can reach."""
    c0 = time.process_time()
    for p in paths:
        pil_loader(p).load()
    side.cpu += time.process_time() - c0
    side.images += len(paths)


def describe_views(method) -> str:
    crops = method.streams()["main"].crops
    return " + ".join(f"{s.count} x {s.size}" for s in crops.values())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dinov2", type=Path, help="facebookresearch/dinov2 checkout")
    ap.add_argument("--msn", type=Path, help="facebookresearch/msn checkout")
    ap.add_argument("--suncet", type=Path, help="facebookresearch/suncet checkout (PAWS)")
    ap.add_argument("--ijepa", type=Path, help="facebookresearch/ijepa checkout")
    ap.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--images", type=int, default=200, help="JPEGs in the generated folder")
    ap.add_argument("--batch", type=int, default=32, help="images per timed batch (one prepare_batch call)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, one batch per side each")
    ap.add_argument("--root", type=Path, help="use this folder of JPEGs instead of generating one")
    ap.add_argument("--no-official", action="store_true", help="time ours only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import random

    random.seed(0)
    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory(prefix="visrep_jpegs_")
        args.root = Path(tmp.name)
        make_folder(args.root, args.images)
    folder = SafeImageFolder(args.root)
    paths = [p for p, _ in folder.samples]
    methods = {n: build(n) for n in args.methods}
    ours = {n: DictDataset(folder, crops=m.streams()["main"].crops, seed=0) for n, m in methods.items()}
    official = {}
    if not args.no_official:
        missing = [n for n, flag in (("dinov2", "dinov2"), ("msn", "msn"), ("paws", "suncet"), ("ijepa", "ijepa"))
                   if n in methods and getattr(args, flag) is None]
        if missing:
            ap.error(f"give the official checkouts of {missing} (or --no-official)")
        official = {n: official_pipeline(n, m, args) for n, m in methods.items()}
    res = {n: {"ours": Side(), "official": Side()} for n in methods}
    decode = Side()
    load0 = os.getloadavg()
    for n, m in methods.items():  # warm-up: a few images each side, not timed
        run_ours(n, m, ours[n], list(range(2)), 0, Side())
        if n in official:
            run_official(official[n], paths[:2], Side())
    for r in range(args.rounds):
        start = (r * args.batch) % len(paths)
        idx = [(start + j) % len(paths) for j in range(args.batch)]
        for n, m in methods.items():
            sides = ["ours", "official"] if r % 2 == 0 else ["official", "ours"]
            for s in sides:
                if s == "ours":
                    run_ours(n, m, ours[n], idx, r + 1, res[n]["ours"])
                elif n in official:
                    run_official(official[n], [paths[i] for i in idx], res[n]["official"])
        run_decode([paths[i] for i in idx], decode)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    load1 = os.getloadavg()
    print(f"\n{len(paths)} JPEGs (500x375 / 375x500, q90), batch {args.batch}, {args.rounds} rounds, 1 thread; "
          f"load average {load0[0]:.1f} before, {load1[0]:.1f} after on {os.cpu_count()} cores; "
          f"torch {torch.__version__}\n")
    print(f"PIL decode alone: {decode.rate():.1f} img/s/core (the ceiling of any pipeline that decodes the full "
          "image; 'bound' = the ratio a pipeline doing nothing but that decode would reach)\n")
    print("| method | views | ours img/s/core | official img/s/core | ratio | ours, loader workers only "
          "(prepare_batch on the GPU) | ratio | bound | ours / official wall img/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    table = {}
    for n, m in methods.items():
        o, f = res[n]["ours"], res[n]["official"]
        frate = f.rate() if f.images else float("nan")
        worker = o.images / max(o.parts["worker"], 1e-9)
        bound = decode.rate() / frate
        table[n] = dict(ours=o.rate(), official=frate, ratio=o.rate() / frate, workers_only=worker,
                        workers_only_ratio=worker / frate, decode_bound=bound)
        fwall = f.rate(wall=True) if f.images else float("nan")
        print(f"| {n} | {describe_views(m)} | {o.rate():.1f} | {frate:.1f} | {o.rate() / frate:.2f}x | {worker:.1f} "
              f"| {worker / frate:.2f}x | {bound:.2f}x | {o.rate(wall=True):.1f} / {fwall:.1f} |")
    if tmp is not None:
        tmp.cleanup()
    return table


if __name__ == "__main__":
    main()
