"""Tests for visrep.data: datasets, transforms and loaders (no network, no GPU, each test < 2 s)."""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DistributedSampler

from visrep.data import (
    DatasetNotFoundError,
    IDXFormatError,
    InMemoryBatches,
    ProceduralShapes,
    ResumableSampler,
    SafeImageFolder,
    TensorImageDataset,
    UnreadableImageWarning,
    batch_normalize,
    batch_random_resized_crop,
    batch_resize_center_crop,
    build_dataset,
    build_loader,
    dataset_stats,
    eval_transform,
    read_idx,
    sample_rrc_boxes,
    set_epoch,
    train_transform,
)
from visrep.data import datasets as ds_mod
from visrep.data import fashion_mnist as fmnist_mod
from visrep.data.transforms import TRAIN_KINDS


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _idx_bytes(t: torch.Tensor) -> bytes:
    assert t.dtype == torch.uint8
    return struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape) + t.numpy().tobytes()


def _write_fmnist(folder: Path, split: str = "train", n: int = 12, gz: bool = True, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    prefix = "train" if split == "train" else "t10k"
    for stem, t in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(t)
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return images, labels


# ------------------------------------------------------------------------------------------
# Fashion-MNIST
# ------------------------------------------------------------------------------------------
@pytest.mark.fashion_mnist  # tests/conftest.py: a skip when missing, a failure under CI=true
def test_fashion_mnist_from_debian_path():
    deb = Path(ds_mod.DEBIAN_FASHION_MNIST_DIR)
    ds = build_dataset("fashion_mnist", split="test")
    assert ds.source == str(deb)
    images, labels = ds.tensors()
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [1000] * 10
    assert (ds.num_classes, ds.in_chans, ds.image_size) == (10, 1, 28)
    assert ds.classes[0] == "T-shirt/top" and len(ds) == 10000
    img, y = ds[0]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8 and isinstance(y, int)
    # a transform v2 pipeline works on the items
    ds.transform = eval_transform(28, *dataset_stats("fashion_mnist"))
    x, _ = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)


@pytest.mark.parametrize("layout,gz", [("flat", True), ("flat", False), ("torchvision", True)])
def test_fashion_mnist_explicit_root(tmp_path, monkeypatch, layout, gz):
    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    images, labels = _write_fmnist(folder, "train", n=12, gz=gz)
    ds = build_dataset("fmnist", "train", root=tmp_path)
    got_images, got_labels = ds.tensors()
    assert torch.equal(got_images, images.unsqueeze(1))
    assert torch.equal(got_labels, labels.long())
    assert ds.source == str(folder)


def test_fashion_mnist_missing_without_root_names_all_three_options(tmp_path, monkeypatch):
    debian = tmp_path / "not-installed"
    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("fashion_mnist", "test")
    msg = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "data.root" in msg and "--data-root" in msg
    assert str(debian) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "data.download=true" in msg and "internet" in msg


def test_fashion_mnist_explicit_empty_root_is_an_error(tmp_path, monkeypatch):
    """An explicit root must hold the data: no silent fall-back on Debian's copy, even when it exists."""
    debian = tmp_path / "debian"
    _write_fmnist(debian, "train", n=5)
    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    assert len(build_dataset("fashion_mnist", "train")) == 5  # no root: Debian's copy is used
    root = tmp_path / "my-data"
    root.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("fashion_mnist", "train", root=root)
    msg = str(info.value)
    assert str(root) in msg and "data.root" in msg and "--data-root" in msg
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg  # the files looked for
    assert "data.download=true" in msg and "remove data.root" in msg
    # a root that does not exist at all: same error, naming it
    with pytest.raises(DatasetNotFoundError, match="no-such-folder"):
        build_dataset("fashion_mnist", "test", root=tmp_path / "no-such-folder")


def test_fashion_mnist_download_option(tmp_path, monkeypatch):
    """data.download=true goes through torchvision (faked here: no network in tests)."""
    import torchvision

    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    calls = []

    def fake_fmnist(root, train=True, download=False):
        calls.append((root, train, download))
        _write_fmnist(Path(root) / "FashionMNIST" / "raw", "train" if train else "test", n=7)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fmnist)
    ds = build_dataset("fashion_mnist", "test", root=tmp_path / "dl", download=True)
    assert len(ds) == 7 and calls == [(str(tmp_path / "dl"), False, True)]

    def offline(root, train=True, download=False):
        raise RuntimeError("Error downloading t10k-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError, match="Error downloading") as info:
        build_dataset("fashion_mnist", "train", root=tmp_path / "dl2", download=True)
    assert str(tmp_path / "dl2") in str(info.value) and "remove data.root" in str(info.value)
    # without a root the failed download is listed after the Debian path
    monkeypatch.setattr(ds_mod, "DEFAULT_DOWNLOAD_ROOT", str(tmp_path / "default"))
    with pytest.raises(DatasetNotFoundError, match="(?s)apt-get install dataset-fashion-mnist.*Error downloading"):
        build_dataset("fashion_mnist", "train", download=True)


def test_truncated_idx_file_error_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ds_mod, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    _write_fmnist(tmp_path, "train", n=6, gz=False)
    img_file = tmp_path / "train-images-idx3-ubyte"
    img_file.write_bytes(img_file.read_bytes()[:-100])  # cut the last 100 bytes
    with pytest.raises(IDXFormatError, match="truncated") as info:
        build_dataset("fashion_mnist", "train", root=tmp_path)
    assert str(img_file) in str(info.value)


def test_corrupt_idx_files(tmp_path):
    # cut gzip stream
    good = gzip.compress(_idx_bytes(torch.zeros(50, 28, 28, dtype=torch.uint8)))
    cut = tmp_path / "cut-images-idx3-ubyte.gz"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(IDXFormatError) as info:
        read_idx(cut)
    assert str(cut) in str(info.value)
    # wrong magic number
    bad = tmp_path / "bad-labels-idx1-ubyte"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 20)
    with pytest.raises(IDXFormatError, match="magic") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)
    # labels / images count mismatch is caught too
    folder = tmp_path / "mismatch"
    _write_fmnist(folder, "test", n=5, gz=False)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(torch.zeros(4, dtype=torch.uint8)))
    with pytest.raises(IDXFormatError, match="4 labels"):
        fmnist_mod._load_fmnist_pair(folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte")


def test_cifar_without_root_or_files_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.download=true"):
        build_dataset("cifar10", "train")
    with pytest.raises(DatasetNotFoundError, match="(?s)cifar-100-python.*data.download=true") as info:
        build_dataset("cifar100", "test", root=tmp_path)
    assert str(tmp_path) in str(info.value)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("mnist-but-not")


# ------------------------------------------------------------------------------------------
# ImageFolder with bad files
# ------------------------------------------------------------------------------------------
def _make_folder(root: Path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    good = []
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            p = root / cls / f"img{i}.png"
            ch = 1 if i == 0 else 3  # a grayscale PNG is converted to RGB
            arr = torch.randint(0, 256, (10 + i, 12, ch), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr[..., 0] if ch == 1 else arr).save(p)
            good.append(p)
    corrupt = root / "cat" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4)
    empty = root / "dog" / "empty.png"
    empty.write_bytes(b"")
    return good, [corrupt, empty]


def test_imagefolder_skips_corrupt_and_empty_files(tmp_path):
    good, bad = _make_folder(tmp_path)
    ds = build_dataset("imagefolder", "train", root=tmp_path)
    assert isinstance(ds, SafeImageFolder) and len(ds) == 8 and ds.classes == ["cat", "dog"]
    with pytest.warns(UnreadableImageWarning) as rec:
        items = [ds[i] for i in range(len(ds))]
    msgs = [str(w.message) for w in rec]
    for p in bad:
        assert any(str(p) in m for m in msgs), (p, msgs)
    assert ds.num_skipped == 2 and sorted(ds.skipped) == sorted(map(str, bad))
    for img, y in items:
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and y in (0, 1)
    # bad files are remembered: no new warnings the second time round
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ = [ds[i] for i in range(len(ds))]


def test_imagefolder_verify_prescan(tmp_path):
    good, bad = _make_folder(tmp_path)
    with pytest.warns(UnreadableImageWarning) as rec:
        ds = SafeImageFolder(tmp_path, verify=True)
    msgs = [str(w.message) for w in rec]
    assert len(ds) == len(good) and ds.num_skipped == 2
    assert all(any(str(p) in m for m in msgs) for p in bad)
    assert any("skipped 2 unreadable image(s) of 8" in m for m in msgs)  # the summary
    tf = train_transform("ijepa", 16, *dataset_stats("imagenet"))
    ds.transform = tf
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_imagefolder_split_subfolder(tmp_path):
    _make_folder(tmp_path / "val")
    with pytest.warns(UnreadableImageWarning) as rec:
        ds = build_dataset("imagefolder", "val", root=tmp_path, verify="fast")
    assert len(rec) == 3 and "skipped 2 unreadable" in str(rec[-1].message)
    assert len(ds) == 6 and ds.root == str(tmp_path / "val")


# ------------------------------------------------------------------------------------------
# Procedural
# ------------------------------------------------------------------------------------------
def test_procedural_deterministic_and_captions():
    a = ProceduralShapes(num_samples=40, image_size=24, seed=3)
    b = build_dataset("procedural", "train", num_samples=40, image_size=24, seed=3)
    ia, la = a.tensors()
    ib, lb = b.tensors()
    assert torch.equal(ia, ib) and torch.equal(la, lb)
    assert ia.shape == (40, 3, 24, 24) and ia.dtype == torch.uint8
    # on-the-fly items equal the batch rendering, in any order
    for i in (7, 0, 39, 7):
        img, y = a[i]
        assert torch.equal(img, ia[i]) and y == int(la[i])
    assert a.num_classes == 6 and int(la.max()) < 6 and len(set(la.tolist())) > 1
    c = ProceduralShapes(num_samples=40, image_size=24, seed=4)
    assert not torch.equal(c.tensors()[0], ia)
    t = ProceduralShapes(num_samples=40, image_size=24, seed=3, split="test")
    assert not torch.equal(t.tensors()[0], ia)
    attrs = a.attributes(5)
    caps = a.captions(5)
    assert len(caps) >= 3 and all(attrs["shape"] in cap for cap in caps)
    assert any(attrs["colour"] in cap and attrs["size"] in cap for cap in caps)
    assert a.classes[a[5][1]] == attrs["shape"]


def test_procedural_options():
    g = ProceduralShapes(num_samples=10, image_size=16, in_chans=1, label="colour", shapes=("circle", "square"))
    img, y = g[3]
    assert img.shape == (1, 16, 16) and g.num_classes == 8 and 0 <= y < 8
    assert g.attributes(3)["shape"] in ("circle", "square")
    assert all(g.attributes(3)["colour"] not in c for c in g.captions(3))  # no colour words in grayscale
    with pytest.raises(IndexError):
        g.attributes(10)


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", TRAIN_KINDS)
@pytest.mark.parametrize("chans", [1, 3])
def test_train_transform_kinds(kind, chans):
    mean, std = dataset_stats("cifar10", in_chans=chans)
    tf = train_transform(kind, 20, mean, std, in_chans=chans)
    x = tf(torch.randint(0, 256, (chans, 28, 30), dtype=torch.uint8))
    assert x.shape == (chans, 20, 20) and x.dtype == torch.float32


def test_eval_transform():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    x = eval_transform(32, (0.5,) * 3, (0.5,) * 3)(img)
    assert torch.allclose(x, img.float() / 255 * 2 - 1, atol=1e-6)  # native size: untouched
    wide = torch.randint(0, 256, (5, 3, 40, 60), dtype=torch.uint8)
    y = eval_transform(24, (0.0,) * 3, (1.0,) * 3, crop_pct=0.875)(wide[0])
    assert y.shape == (3, 24, 24)
    assert batch_resize_center_crop(wide, 24, crop_pct=0.875).shape == (5, 3, 24, 24)
    same = batch_normalize(batch_resize_center_crop(img[None], 32), (0.5,) * 3, (0.5,) * 3)
    assert torch.allclose(same[0], x, atol=1e-6)


@pytest.mark.parametrize("backend", ["roi_align", "grid_sample"])
def test_batch_random_resized_crop(backend):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (64, 3, 28, 28), generator=g, dtype=torch.uint8)
    out = batch_random_resized_crop(imgs, 20, scale=(0.3, 1.0), generator=torch.Generator().manual_seed(1),
                                    backend=backend)
    assert out.shape == (64, 3, 20, 20) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    again = batch_random_resized_crop(imgs, 20, generator=torch.Generator().manual_seed(1), backend=backend)
    other = batch_random_resized_crop(imgs, 20, generator=torch.Generator().manual_seed(2), backend=backend)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # full-image, same-size crop reproduces the input exactly; hflip mirrors some samples
    ident, boxes, flips = batch_random_resized_crop(imgs, 28, scale=(1, 1), ratio=(1, 1), hflip=True,
                                                    generator=g, backend=backend, return_boxes=True)
    ref = imgs.float() / 255
    ref = torch.where(flips[:, None, None, None], ref.flip(-1), ref)
    assert torch.allclose(ident, ref, atol=1e-5) and 0 < int(flips.sum()) < 64
    assert (boxes == torch.tensor([0, 0, 28, 28])).all()
    # normalisation in the same pass
    norm = batch_random_resized_crop(imgs, 28, scale=(1, 1), ratio=(1, 1), mean=(0.5,) * 3, std=(0.25,) * 3,
                                     backend=backend)
    assert torch.allclose(norm, (imgs.float() / 255 - 0.5) / 0.25, atol=1e-4)


def test_rrc_boxes_in_range():
    g = torch.Generator().manual_seed(0)
    boxes = sample_rrc_boxes(4000, 32, 24, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), generator=g)
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 24).all() and (y2 <= 32).all()
    assert (w > 0).all() and (h > 0).all()
    area = (w * h).float() / (32 * 24)
    assert area.min() > 0.25 and area.max() <= 1.0 and 0.5 < area.mean() < 0.75
    # every position is reachable: crops are not all anchored at the corner
    assert x1.float().std() > 1 and y1.float().std() > 1


def test_rrc_boxes_host_path_equals_vectorised():
    """A worker's few views take the boxes in Python floats: the same draws and float64 arithmetic as the
    vectorised path, hence the same boxes (fallbacks included: a 20 x 200 strip has no valid attempt
    at scale 0.9-1.0 within 3/4-4/3)."""
    from visrep.data.transforms import _rrc_boxes, _rrc_boxes_host, sample_rrc_boxes_host

    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        for H, W, scale in ((375, 500, (0.3, 1.0)), (500, 333, (0.05, 0.32)), (20, 200, (0.9, 1.0)),
                            (28, 28, (0.1, 0.4))):
            u = torch.rand(4, 3, 10, generator=g, dtype=torch.float64)
            ratio = (3 / 4, 4 / 3)
            assert torch.equal(_rrc_boxes_host(u.tolist(), H, W, scale, ratio), _rrc_boxes(u, H, W, scale, ratio))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    host = sample_rrc_boxes_host(5, 375, 500, (0.3, 1.0), generator=g1)
    assert host == sample_rrc_boxes(5, 375, 500, (0.3, 1.0), generator=g2).tolist()


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched inside the ``with`` block (a Python loop over samples multiplies them)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["roi_align", "grid_sample"])
def test_batch_rrc_uses_no_python_loop_per_sample(backend):
    from torchvision.ops import roi_align

    mean, std = (0.286, 0.5), (0.353, 0.25)
    # 1. the same number of dispatched ops for 4 and 256 images: no per-sample work at the Python level
    counts = {}
    for n in (4, 256):
        imgs = torch.randint(0, 256, (n, 2, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        with _CountOps() as ops:
            batch_random_resized_crop(imgs, 20, hflip=True, mean=mean, std=std, backend=backend,
                                      generator=torch.Generator().manual_seed(0))
        counts[n] = ops.n
    assert counts[4] == counts[256], f"op count grows with the batch: {counts}"
    # 2. and every sample equals the same crop computed for that image alone (its own box, flip, normalisation)
    imgs = torch.randint(0, 256, (24, 2, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    out, boxes, flips = batch_random_resized_crop(imgs, 20, hflip=True, mean=mean, std=std, backend=backend,
                                                  generator=torch.Generator().manual_seed(0), return_boxes=True)
    assert out.shape == (24, 2, 20, 20) and 0 < int(flips.sum()) < 24 and len(set(map(tuple, boxes.tolist()))) > 12
    x = imgs.float() / 255
    m, sd = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    for i in range(24):
        x1, y1, x2, y2 = boxes[i].tolist()
        if backend == "roi_align":
            ref = roi_align(x[i:i + 1], [boxes[i:i + 1].float()], output_size=20, aligned=True)[0]
        else:
            # one bilinear sample per output pixel at the crop's pixel centres (border-clamped)
            xs = x1 + (torch.arange(20) + 0.5) * (x2 - x1) / 20 - 0.5
            ys = y1 + (torch.arange(20) + 0.5) * (y2 - y1) / 20 - 0.5
            grid = torch.stack(torch.meshgrid(2 * (xs + 0.5) / 28 - 1, 2 * (ys + 0.5) / 28 - 1, indexing="xy"), -1)
            ref = torch.nn.functional.grid_sample(x[i:i + 1], grid[None], mode="bilinear", padding_mode="border",
                                                  align_corners=False)[0]
        ref = (ref.flip(-1) if flips[i] else ref).sub(m).div(sd)
        torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=0, msg=lambda e, i=i: f"sample {i}: {e}")


# ------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------
def _toy(n=50, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8), torch.arange(n)


@pytest.mark.parametrize("drop_last", [True, False])
def test_in_memory_batches_sharding(drop_last):
    images, labels = _toy(50)
    ws = 3
    per_rank = []
    for r in range(ws):
        it = InMemoryBatches(images, labels, batch_size=4, seed=7, rank=r, world_size=ws, drop_last=drop_last,
                             return_indices=True)
        batches = list(it.batches(epoch=2))
        assert len(batches) == len(it)
        idx = torch.cat([b[2] for b in batches])
        for x, y, i in batches:
            assert torch.equal(y, labels[i]) and torch.equal(x, images[i])
        per_rank.append(idx)
        # same order as torch's own DistributedSampler for (seed, epoch, rank, world_size)
        s = DistributedSampler(range(50), num_replicas=ws, rank=r, shuffle=True, seed=7, drop_last=drop_last)
        s.set_epoch(2)
        assert list(s)[: len(idx)] == idx.tolist()
    assert len({len(p) for p in per_rank}) == 1  # every rank has the same number of batches
    if drop_last:
        assert len(per_rank[0]) == 16  # 50 // 3 = 16 per rank -> 4 full batches
        allidx = torch.cat(per_rank)
        assert len(set(allidx.tolist())) == len(allidx)  # disjoint
    else:
        assert set(torch.cat(per_rank).tolist()) == set(range(50))  # nothing lost (padding wraps)
    # epochs differ, and so do the orders
    it = InMemoryBatches(images, labels, batch_size=4, seed=7, rank=0, world_size=ws)
    assert not torch.equal(it.indices(0), it.indices(1))


def test_in_memory_batches_resume_mid_epoch():
    images, labels = _toy(40, size=12)

    def tf(x, generator):
        return batch_random_resized_crop(x, 10, hflip=True, generator=generator)

    def make():
        return InMemoryBatches(images, labels, batch_size=6, transform=tf, seed=11)

    full = make()
    run = [b for _ in range(2) for b in full]  # epochs 0 and 1, uninterrupted
    assert len(run) == 2 * len(full) == 12 and full.state_dict()["epoch"] == 2
    # stop after 2 batches of epoch 1, "checkpoint", resume in a new iterator
    a = make()
    list(a)  # epoch 0
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    assert state == {"epoch": 1, "batch": 2, "seed": 11}
    b = make()
    b.load_state_dict(state)
    resumed = list(b)
    for (x1, y1), (x2, y2) in zip(run[6 + 2:], resumed, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the pure form gives the same
    tail = list(make().batches(1, start_batch=2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(tail, resumed))
    assert b.state_dict() == {"epoch": 2, "batch": 0, "seed": 11}
    with pytest.raises(ValueError):
        make().load_state_dict({"epoch": 0, "batch": 0, "seed": 12})


def test_in_memory_batches_from_dataset():
    ds = ProceduralShapes(num_samples=24, image_size=16)

    def tf(x, generator):
        return batch_normalize(batch_resize_center_crop(x, 16), (0.5,) * 3, (0.5,) * 3)

    it = InMemoryBatches.from_dataset(ds, batch_size=8, transform=tf, shuffle=False)
    x, y = next(iter(it))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and torch.equal(y, ds.tensors()[1][:8])


def test_build_loader_seeded_resumable_and_sharded():
    images, labels = _toy(30)
    ds = TensorImageDataset(images, labels)
    loader = build_loader(ds, batch_size=4, seed=5, epoch=1)
    assert loader.pin_memory == torch.cuda.is_available() and loader.drop_last
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 1
    ys = [y for _, y in loader]
    assert len(ys) == 7 and all(y.shape == (4,) for y in ys)
    # same order as the in-memory path
    mem = InMemoryBatches(images, labels, batch_size=4, seed=5)
    assert all(torch.equal(a, b[1]) for a, b in zip(ys, mem.batches(1), strict=True))
    # resume at batch 3 of epoch 1
    set_epoch(loader, 1, start_batch=3)
    assert [y.tolist() for _, y in loader] == [y.tolist() for y in ys[3:]]
    set_epoch(loader, 2)
    assert [y.tolist() for _, y in loader] != [y.tolist() for y in ys]
    # explicit rank / world_size: a sharded ResumableSampler, no process group needed
    sharded = build_loader(ds, batch_size=2, rank=1, world_size=2, seed=5)
    assert isinstance(sharded.sampler, ResumableSampler) and sharded.sampler.rank == 1
    assert len(sharded) == 7  # 15 samples per rank -> 7 full batches


def test_build_loader_with_workers():
    images, labels = _toy(16)
    loader = build_loader(TensorImageDataset(images, labels), batch_size=4, num_workers=1, seed=0,
                          pin_memory=False)
    assert loader.persistent_workers
    first = [y.tolist() for _, y in loader]
    set_epoch(loader, 0)
    assert [y.tolist() for _, y in loader] == first
    del loader
