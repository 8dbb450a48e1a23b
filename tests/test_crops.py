"""Views from the full-resolution image (``StreamSpec.crops``), on both data paths.

* The boxes a method's views are cut with, relative to the full (non-square) image, follow the
  official transform's distribution (torchvision's ``RandomResizedCrop.get_params`` with the same
  scale / ratio): area fraction and log aspect ratio (means within 5 standard errors of the
  difference, two-sample KS at alpha 1e-4), flip rate 1/2 within 5 standard errors, output sizes equal.
* An image-folder run of every method that declares views cuts them from the full images (never a
  pre-cropped square), with ``data.num_workers=2`` too, and resumes exactly: a sample's views are a
  pure function of ``(seed, epoch, index)``, whatever the worker or the resume point.
"""
from __future__ import annotations

import math
import multiprocessing
from pathlib import Path

import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from visrep.config import load_config
from visrep.data.crops import CropSpec, CropViews
from visrep.methods import build_method
from visrep.runner import data_info, load_split

CONFIGS = Path(__file__).resolve().parents[1] / "visrep" / "configs"
VIEW_METHODS = ["msn", "dinov2", "paws", "ijepa", "iwm", "mae", "supervised", "clip"]
SIZES = [(375, 500), (500, 333)]  # (H, W): landscape and portrait, as ImageNet's


def declared_crops(name: str) -> dict[str, dict[str, CropSpec]]:
    cfg = load_config(CONFIGS / name / "tiny.yaml")
    method = build_method(cfg, data_info(cfg, load_split(cfg, "train")))
    return {stream: spec.crops for stream, spec in method.streams().items() if spec.crops}


def recorded_boxes(spec: CropSpec, hw: tuple[int, int], n: int, monkeypatch) -> tuple[torch.Tensor, float, set]:
    """Relative (area, log aspect) of ``n`` views cut by CropViews from a horizontal-gradient image, the
    flip rate (a flipped gradient decreases) and the output sizes."""
    import visrep.data.crops as crops

    H, W = hw
    image = torch.linspace(0, 255, W).round().to(torch.uint8).expand(1, H, W).contiguous()
    seen, real = [], crops.TF.resized_crop

    def spy(img, top, left, height, width, size, **kw):
        assert tuple(img.shape[-2:]) == (H, W)  # cut from the full image
        seen.append((height * width / (H * W), math.log(width / height)))
        return real(img, top, left, height, width, size, **kw)

    monkeypatch.setattr(crops.TF, "resized_crop", spy)
    view = CropViews({"v": spec})
    g = torch.Generator().manual_seed(0)
    flips, sizes = 0, set()
    for _ in range(math.ceil(n / spec.count)):
        out = view(image, g)["v"].float()
        sizes.add(tuple(out.shape[-2:]))
        left, right = out[..., :, :2].mean((-3, -2, -1)), out[..., :, -2:].mean((-3, -2, -1))
        flips += int((left > right).sum())
    monkeypatch.undo()
    return torch.tensor(seen[:n], dtype=torch.float64), flips / len(seen), sizes


KS_CRIT = math.sqrt(-math.log(1e-4 / 2) / 2)  # two-sample Kolmogorov-Smirnov at alpha = 1e-4


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the two empirical distribution functions."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True) / len(a)
    fb = torch.searchsorted(b.sort().values, grid, right=True) / len(b)
    return float((fa - fb).abs().max())


def official_boxes(spec: CropSpec, hw: tuple[int, int], n: int) -> torch.Tensor:
    torch.manual_seed(1)
    image = torch.zeros(1, *hw)
    out = []
    for _ in range(n):
        _, _, h, w = RandomResizedCrop.get_params(image, list(spec.scale), list(spec.ratio))
        out.append((h * w / (hw[0] * hw[1]), math.log(w / h)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", VIEW_METHODS)
def test_view_boxes_follow_the_official_distribution_on_the_full_image(name, monkeypatch):
    n = 800
    for stream, specs in declared_crops(name).items():
        for kind, spec in specs.items():
            for hw in SIZES:
                ours, flip_rate, sizes = recorded_boxes(spec, hw, n, monkeypatch)
                ref = official_boxes(spec, hw, n)
                what = f"{name}/{stream}/{kind} on {hw}"
                for col, label in ((0, "area"), (1, "log aspect")):
                    se = math.sqrt(ours[:, col].var() / n + ref[:, col].var() / n) + 1e-12
                    assert abs(ours[:, col].mean() - ref[:, col].mean()) < 5 * se, f"{what}: mean {label}"
                    assert ks_statistic(ours[:, col], ref[:, col]) < KS_CRIT * math.sqrt(2 / n), f"{what}: {label} KS"
                assert sizes == {(spec.size, spec.size)}
                expected = 0.5 if spec.hflip else 0.0
                assert abs(flip_rate - expected) < 5 * math.sqrt(0.25 / n) + 1e-9, f"{what}: flip rate {flip_rate}"


def test_a_view_spec_off_the_official_one_is_caught(monkeypatch):
    """The comparison has teeth: views cut from a centre square (the old pipeline) differ."""
    spec = CropSpec(16, 1, (0.3, 1.0))
    square = CropSpec(16, 1, (0.3 * 375 / 500, 1.0 * 375 / 500))  # areas relative to the full 375x500 image
    ours, _, _ = recorded_boxes(square, (375, 500), 1500, monkeypatch)
    ref = official_boxes(spec, (375, 500), 1500)
    se = math.sqrt(ours[:, 0].var() / 1500 + ref[:, 0].var() / 1500)
    assert abs(ours[:, 0].mean() - ref[:, 0].mean()) > 5 * se
    assert ks_statistic(ours[:, 0], ref[:, 0]) > KS_CRIT * math.sqrt(2 / 1500)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    g = torch.Generator().manual_seed(0)
    for i in range(16):  # 4 classes (PAWS draws 4 per step), both shapes in each
        h, w = SIZES[i % 2]
        d = root / f"class{i // 4}"
        d.mkdir(exist_ok=True)
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"{i}.jpg", quality=85)
    return root


def _run(name: str, root: Path, out: Path, steps: int, workers: int, resume: bool = False):
    from visrep.runner import pretrain

    extra = ["data.caption_templates=[a photo of a {}.]"] if name in ("clip", "siglip", "llip") else []
    cfg = load_config(CONFIGS / name / "tiny.yaml",
                      [f"train.out_dir={out}", f"train.max_steps={steps}", "train.epochs=8", "data.name=imagefolder",
                       f"data.root={root}", f"data.num_workers={workers}", "data.in_memory=false", "train.ckpt_every=2",
                       *extra])
    return pretrain(cfg, resume=resume)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["msn", "pmsn", "dinov2", "paws", "clip", "siglip", "llip", "ijepa", "stop", "iwm",
                                  "mae", "supervised", "diffusion"])
def test_image_folder_run_cuts_full_resolution_views_and_resumes_exactly(name, jpeg_folder, tmp_path, monkeypatch):
    """Every method, on a folder of 375x500 and 500x333 (H x W) JPEGs: its views are cut from the full images (DiT
    excepted: its official input is ADM's centre crop, ``center_crop_arr``, and it takes no random crop),
    with 2 loader workers, and a resumed run continues exactly."""
    import visrep.data.crops as crops

    shapes, real = set(), crops.TF.resized_crop

    def spy(img, *a, **kw):
        shapes.add(tuple(img.shape[-2:]))
        return real(img, *a, **kw)

    monkeypatch.setattr(crops.TF, "resized_crop", spy)
    _run(name, jpeg_folder, tmp_path / "inproc", 1, workers=0)
    expected = set() if name == "diffusion" else set(SIZES)
    assert shapes == expected, f"{name}: views cut from {shapes}, not the full images"
    monkeypatch.undo()

    m_full, full = _run(name, jpeg_folder, tmp_path / "full", 4, workers=2)
    # the loader's persistent workers end with the run (left to the garbage collector, each later cost a
    # shutdown join of up to 5 s: this file took 65 s instead of 3 s in the full suite)
    assert not multiprocessing.active_children(), f"{name}: loader workers outlived the run"
    _run(name, jpeg_folder, tmp_path / "cut", 2, workers=2)
    m_res, res = _run(name, jpeg_folder, tmp_path / "cut", 4, workers=2, resume=True)
    assert res.losses == pytest.approx(full.losses[2:], rel=0, abs=0), f"{name}: resumed losses differ"
    a, b = m_full.state_dict(), m_res.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: resumed state differs"
