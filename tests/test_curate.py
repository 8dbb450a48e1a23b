"""Data curation (``visrep curate``): duplicates removed, a skewed class mix made more balanced, the
file list read back by the data layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.requires("faiss")  # tests/conftest.py: a failure under CI=true

from test_learning import needs_fmnist  # noqa: E402

from visrep.curate import balanced_sample, curate, curate_embeddings, read_file_list, write_file_list  # noqa: E402
from visrep.runner import raw_pixel_features  # noqa: E402


def _skewed_with_duplicates():
    """Fashion-MNIST with class 0 ten times more frequent, 200 exact and 200 near copies appended."""
    from visrep.curate import data_only_config
    from visrep.runner import load_split

    cfg = data_only_config(["data.name=fashion_mnist"])
    images, labels = load_split(cfg, "train").tensors()
    g = torch.Generator().manual_seed(0)
    keep = torch.cat([torch.nonzero(labels == c).flatten()[: (1500 if c == 0 else 150)] for c in range(10)])
    images, labels = images[keep], labels[keep]
    n = images.shape[0]
    src = torch.randperm(n, generator=g)[:400]
    noise = torch.randint(-3, 4, images[src[200:]].shape, generator=g)
    near = (images[src[200:]].int() + noise).clamp(0, 255).to(torch.uint8)
    images = torch.cat([images, images[src[:200]], near])
    labels = torch.cat([labels, labels[src]])
    return images, labels, n


@needs_fmnist
def test_curation_removes_duplicates_and_balances_classes(tmp_path):
    images, labels, n_orig = _skewed_with_duplicates()
    # raw pixels as the encoder (any encoder works); hierarchical k-means (measured here: class-0 share
    # 0.53 -> 0.33, class entropy 1.73 -> 2.08; one level with 40 clusters only reaches 0.50)
    result = curate(raw_pixel_features, images, progress=False, dedup_threshold=0.995, size=1000,
                    n_clusters=50, levels=2, seed=0)
    kept = result.indices
    print(result.report())
    assert result.counts["input"] == images.shape[0]
    # every injected copy (exact or near) is gone: its original has a lower index and is kept instead
    dedup = curate_embeddings(raw_pixel_features(images), dedup_threshold=0.995).indices
    assert not np.isin(np.arange(n_orig, images.shape[0]), dedup).any()
    assert result.counts["deduplicated"] <= n_orig
    assert len(kept) == 1000 and len(np.unique(kept)) == 1000
    before = np.bincount(labels[:n_orig].numpy(), minlength=10) / n_orig
    after = np.bincount(labels[kept].numpy(), minlength=10) / len(kept)
    print("class 0 share before", before[0], "after", after[0])
    assert after[0] < before[0] - 0.1                      # the dominant class gives up a clear share
    entropy = lambda p: -(p[p > 0] * np.log(p[p > 0])).sum()  # noqa: E731
    assert entropy(after) > entropy(before) + 0.2           # measurably closer to uniform
    # the file list round trip through the data layer
    path = write_file_list(tmp_path / "curated.txt", kept)
    assert read_file_list(path) == kept.tolist()


def test_balanced_sample_water_fills_small_clusters():
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:3]
    sizes = [500, 20, 20]
    x = np.concatenate([c + 0.05 * rng.normal(size=(s, 8)) for c, s in zip(centres, sizes)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    rows, clusters = balanced_sample(x, 120, n_clusters=3, seed=0)
    counts = sorted(np.bincount(clusters, minlength=3).tolist())
    assert counts == [20, 20, 80] and len(np.unique(rows)) == 120
    rows2, _ = balanced_sample(x, 120, n_clusters=3, levels=2, seed=0)
    assert len(np.unique(rows2)) == 120


def test_retrieval_around_seeds():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    result = curate_embeddings(x, dedup_threshold=None, seeds=x[:3], retrieval_k=5)
    assert result.counts["retrieved"] <= 15 and set(range(3)) <= set(result.indices.tolist())


def test_subset_file_is_read_by_the_data_layer(tmp_path):
    from visrep.curate import data_only_config
    from visrep.runner import load_split

    path = write_file_list(tmp_path / "list.txt", [5, 2, 9])
    full = load_split(data_only_config(["data.name=procedural", "data.image_size=8"]), "train")
    ds = load_split(data_only_config(["data.name=procedural", "data.image_size=8", f"data.subset_file={path}"]),
                    "train")
    assert len(ds) == 3
    assert torch.equal(ds.tensors()[0], full.tensors()[0][[5, 2, 9]])


def test_curate_cli_writes_a_file_list(tmp_path, capsys):
    from visrep.cli import main

    out = tmp_path / "list.txt"
    assert main(["curate", "raw", "--out", str(out), "--dedup", "0.999", "--size", "40", "--clusters", "4",
                 "--set", "data.name=procedural", "data.image_size=8", "data.train_subset=200"]) == 0
    printed = capsys.readouterr().out
    assert "deduplicated" in printed and "balanced" in printed
    indices = read_file_list(out)
    assert len(indices) == 40 and len(set(indices)) == 40 and max(indices) < 200
