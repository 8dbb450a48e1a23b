"""Data loaders: a seeded, resumable DataLoader factory and a fast in-memory batch iterator.

Both paths visit samples in the same order for the same ``(seed, epoch, rank, world_size)``: the
permutation is ``torch.randperm(n, generator seeded with seed + epoch)`` sharded as
``torch.utils.data.DistributedSampler`` does (pad by wrapping, or truncate with ``drop_last``, then
``indices[rank::world_size]``).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from visrep.utils import mix_seed

__all__ = [
    "dist_info", "epoch_permutation", "shard_indices", "ResumableSampler", "build_loader", "set_epoch",
    "InMemoryBatches",
]


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: explicit values win, else torch.distributed when initialised, else (0, 1)."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    return int(rank), int(world_size)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of an epoch: ``randperm`` seeded by ``seed + epoch`` (DistributedSampler's rule)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(int(seed) + int(epoch))
    return torch.randperm(n, generator=g)


def shard_indices(indices: torch.Tensor, rank: int, world_size: int, drop_last: bool) -> torch.Tensor:
    """This rank's share of ``indices``, padded by wrapping (or truncated) to a multiple of world_size."""
    n = indices.numel()
    if world_size == 1:
        return indices
    if drop_last:
        total = (n // world_size) * world_size
        indices = indices[:total]
    else:
        total = -(-n // world_size) * world_size
        pad = total - n
        if pad:
            reps = -(-pad // max(n, 1))
            indices = torch.cat([indices, indices.repeat(reps)[:pad]])
    return indices[rank:total:world_size]


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (also used with world_size 1) that can start mid-epoch.

    ``set_epoch(epoch, start_index=0)`` selects the epoch's permutation and skips the first
    ``start_index`` indices of this rank's share (``start_batch * batch_size`` to resume).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0
        self.with_epoch = False  # yield (index, epoch): per-sample views seeded by both (DictDataset)

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = int(start_index)

    def indices(self) -> torch.Tensor:
        perm = epoch_permutation(len(self.dataset), self.seed, self.epoch, self.shuffle)
        return shard_indices(perm, self.rank, self.num_replicas, self.drop_last)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self.indices()[self.start_index:].tolist()
        return iter([(i, self.epoch) for i in indices] if self.with_epoch else indices)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive python/numpy seeds from it.
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, collate_fn: Callable | None = None,
                 num_workers: int = 0, pin_memory: bool | None = None, drop_last: bool = True, seed: int = 0,
                 distributed: bool | None = None, epoch: int = 0, start_batch: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 prefetch_factor: int | None = None, persistent_workers: bool | None = None) -> DataLoader:
    """A seeded DataLoader with a :class:`ResumableSampler` (a DistributedSampler) as ``loader.sampler``.

    ``distributed=None`` follows ``torch.distributed.is_initialized()``; explicit ``rank`` /
    ``world_size`` override it (handy for tests). ``pin_memory=None`` pins only when CUDA is
    available; workers persist when ``num_workers > 0``. Call :func:`set_epoch` (or
    ``loader.sampler.set_epoch``) before each epoch; ``epoch``/``start_batch`` set where the
    first iteration starts (resume mid-epoch).
    """
    if distributed is None:
        distributed = (world_size is not None and world_size > 1) or (
            torch.distributed.is_available() and torch.distributed.is_initialized())
    r, ws = dist_info(rank, world_size) if distributed else (0, 1)
    sampler = ResumableSampler(dataset, num_replicas=ws, rank=r, shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch, start_batch * batch_size)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, r))
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kw["worker_init_fn"] = _seed_worker
        if prefetch_factor is not None:
            kw["prefetch_factor"] = prefetch_factor
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last, generator=g, **kw)
    return loader


def set_epoch(loader: Any, epoch: int, start_batch: int = 0) -> None:
    """Select the epoch (and start batch) of a loader from :func:`build_loader` or an InMemoryBatches."""
    if isinstance(loader, InMemoryBatches):
        loader.set_epoch(epoch, start_batch)
        return
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, start_batch * loader.batch_size)
    elif hasattr(sampler, "set_epoch"):
        if start_batch:
            raise ValueError("this loader's sampler cannot start mid-epoch")
        sampler.set_epoch(epoch)


class InMemoryBatches:
    """Batches drawn straight from in-memory tensors: no Dataset, no per-sample Python work.

    Each epoch shuffles indices (seeded by ``(seed, epoch)``, same order as :func:`build_loader`),
    shards them per rank, slices ``images[idx]`` and applies ``transform(images, generator)`` (e.g.
    :func:`~visrep.data.transforms.batch_random_resized_crop`) with a generator seeded by
    ``(seed, epoch, batch, rank)``: any batch can be regenerated exactly, so training resumes
    mid-epoch with :meth:`set_epoch` ``(epoch, start_batch)`` or :meth:`load_state_dict`.

    Iterating runs from the current ``(epoch, batch)`` to the end of the epoch, then moves to the
    next epoch; :meth:`state_dict` is the position of the next batch. ``batches(epoch, start)``
    iterates any epoch without touching that state.

    Yields ``(x, y)`` (plus the sample indices when ``return_indices``). ``device`` moves the data
    there once (GPU fast path); the augmentation generator lives on ``generator_device`` (CPU by
    default, so results do not depend on the accelerator).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
                 shuffle: bool = True, drop_last: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None,
                 device: torch.device | str | None = None, generator_device: torch.device | str = "cpu",
                 return_indices: bool = False):
        if labels is not None and labels.shape[0] != images.shape[0]:
            raise ValueError("images and labels differ in length")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if device is not None:
            images = images.to(device)
            labels = labels.to(device) if labels is not None else None
        self.images, self.labels = images, labels
        self.batch_size = int(batch_size)
        self.transform = transform
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.rank, self.world_size = dist_info(rank, world_size)
        self.generator_device = torch.device(generator_device)
        self.return_indices = return_indices
        self.epoch, self.batch = 0, 0

    @classmethod
    def from_dataset(cls, dataset: Any, batch_size: int, **kw) -> InMemoryBatches:
        """Build from any dataset exposing ``tensors() -> (images, labels)``."""
        images, labels = dataset.tensors()
        return cls(images, labels, batch_size, **kw)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (before dropping the last partial batch)."""
        n, ws = self.images.shape[0], self.world_size
        return n // ws if (self.drop_last and ws > 1) else -(-n // ws)

    def __len__(self) -> int:
        """Batches per epoch for this rank (the same on every rank)."""
        m = self.num_samples
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        perm = epoch_permutation(self.images.shape[0], self.seed, epoch, self.shuffle)
        return shard_indices(perm, self.rank, self.world_size, self.drop_last)

    def batch_generator(self, epoch: int, batch: int) -> torch.Generator:
        g = torch.Generator(device=self.generator_device)
        g.manual_seed(mix_seed(self.seed, epoch, batch, self.rank))
        return g

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple]:
        idx_all = self.indices(epoch)
        nb = len(self)
        if not 0 <= start_batch <= nb:
            raise ValueError(f"start_batch {start_batch} outside 0..{nb}")
        for b in range(start_batch, nb):
            idx = idx_all[b * self.batch_size:(b + 1) * self.batch_size]
            idx_d = idx.to(self.images.device)
            x = self.images.index_select(0, idx_d)
            if self.transform is not None:
                x = self.transform(x, self.batch_generator(epoch, b))
            y = self.labels.index_select(0, idx_d) if self.labels is not None else None
            yield (x, y, idx) if self.return_indices else (x, y)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.batch = int(epoch), int(start_batch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this iterator has seed {self.seed}")
        self.set_epoch(state["epoch"], state.get("batch", 0))

    def __iter__(self) -> Iterator[tuple]:
        epoch, start = self.epoch, self.batch
        for out in self.batches(epoch, start):
            self.batch += 1
            yield out
        self.epoch, self.batch = epoch + 1, 0

    def __repr__(self) -> str:
        return (f"InMemoryBatches(n={self.images.shape[0]}, batch_size={self.batch_size}, batches={len(self)}, "
                f"rank={self.rank}/{self.world_size}, epoch={self.epoch}, batch={self.batch})")
