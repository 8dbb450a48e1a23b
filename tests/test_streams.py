"""Batch dicts on both data paths, and the class-balanced stream (PAWS-style supports)."""
from __future__ import annotations

import torch

from visrep.data.streams import ClassBalancedIndices, DictDataset, collate_dicts, memory_batch
from visrep.methods import StreamSpec


class Labelled(torch.utils.data.Dataset):
    """60 uint8 images, 3 classes x 20 (``targets`` like torchvision folders; no ``tensors()``)."""

    def __init__(self):
        self.images = torch.arange(60 * 4, dtype=torch.uint8).reshape(60, 1, 2, 2)
        self.targets = [i % 3 for i in range(60)]

    def __len__(self):
        return 60

    def __getitem__(self, i):
        return self.images[i], self.targets[i]

    def captions(self, i):
        return [f"image {i}", f"class {self.targets[i]}"]


def test_both_paths_give_the_same_batch_dict():
    ds = Labelled()
    idx = torch.tensor([3, 7, 11])
    loader_batch = collate_dicts([DictDataset(ds, captions=True)[i] for i in idx.tolist()])
    mem_batch = memory_batch(ds, ds.images[idx], torch.tensor(ds.targets)[idx], idx, captions=True)
    assert loader_batch.keys() == mem_batch.keys() == {"image", "label", "index", "caption"}
    for k in ("image", "label", "index"):
        assert torch.equal(loader_batch[k], mem_batch[k]), k
    assert loader_batch["caption"] == mem_batch["caption"] == [[f"image {i}", f"class {i % 3}"] for i in (3, 7, 11)]
    unlabelled = memory_batch(ds, ds.images[idx], None, idx)
    assert unlabelled["label"].tolist() == [-1, -1, -1] and "caption" not in unlabelled


def test_class_balanced_stream_is_balanced_seeded_and_resumable():
    ds = Labelled()
    spec = StreamSpec(sampler="class_balanced", per_class=2, labels_per_class=5)
    s0 = ClassBalancedIndices(ds, spec, name="supports", seed=1, rank=0, world_size=2)
    s1 = ClassBalancedIndices(ds, spec, name="supports", seed=1, rank=1, world_size=2)
    labelled = s0.labelled
    assert labelled.numel() == 15 and torch.equal(labelled, s1.labelled)  # one labelled subset for all
    labels = torch.tensor(ds.targets)
    for step in range(5):
        idx = s0.indices(step)
        assert idx.numel() == 6 and torch.bincount(labels[idx], minlength=3).tolist() == [2, 2, 2]
        assert torch.isin(idx, labelled).all()
        again = ClassBalancedIndices(ds, spec, name="supports", seed=1, rank=0, world_size=2)
        assert torch.equal(again.indices(step), idx)  # a pure function of (seed, stream, step, rank)
    assert any(not torch.equal(s0.indices(t), s1.indices(t)) for t in range(5))  # ranks differ
    assert any(not torch.equal(s0.indices(t), s0.indices(t + 1)) for t in range(5))  # steps differ
    other = ClassBalancedIndices(ds, spec, name="supports", seed=2, rank=0, world_size=2)
    assert not torch.equal(other.labelled, labelled)


def test_class_balanced_subset_options():
    ds = Labelled()
    frac = ClassBalancedIndices(ds, StreamSpec(sampler="class_balanced", label_fraction=0.1, classes=2),
                                name="s", seed=0, rank=0, world_size=1)
    assert frac.labelled.numel() == 6  # 2 of each class's 20
    idx = frac.indices(0)
    assert idx.numel() == 2 and len(set(torch.tensor(ds.targets)[idx].tolist())) == 2
