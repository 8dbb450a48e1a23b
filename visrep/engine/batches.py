"""The batch of every step: the method's data streams assembled, moved to the device and prepared.

    source = BatchSource(cfg, method, train_data, device, rank, world)
    for batch in source(start_step):     # step s: main stream + extra streams, then
        ...                              # method.prepare_batch(batch, generator(seed, s, rank))

The main stream is the shuffled, sharded epoch order: batched slices of in-memory tensors when the
dataset allows it (``data.in_memory``), else a DataLoader. Extra streams (``sampler="class_balanced"``,
e.g. PAWS's supports) draw each step's indices from ``(seed, stream, step, rank)``, so a resumed run
sees the same batches.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from visrep.data.datasets import in_memory
from visrep.data.loaders import InMemoryBatches, build_loader, set_epoch
from visrep.data.streams import ClassBalancedIndices, DictDataset, collate_dicts, memory_batch
from visrep.methods.base import Method, StreamSpec
from visrep.utils import mix_seed


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor of a (nested) batch on ``device``; other values unchanged."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        out = [to_device(b, device) for b in batch]
        return type(batch)(out) if not hasattr(batch, "_fields") else type(batch)(*out)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class BatchSource:
    """``source(start_step)`` yields the prepared batches of steps ``start_step, start_step + 1, ...``;
    ``steps_per_epoch`` and ``batch_size`` (per process) say how the main stream is cut."""

    def __init__(self, cfg, method: Method, train_data, device: torch.device, rank: int = 0, world: int = 1):
        self.cfg, self.method, self.data, self.device, self.rank = cfg, method, train_data, device, rank
        tc, streams = cfg.train, method.streams()
        main = streams.get("main", StreamSpec())
        if main.sampler != "epoch":
            raise ValueError(f"the main stream must use sampler='epoch', got {main.sampler!r}")
        self.captions = main.captions
        self.batch_size = main.batch_size or tc.batch_size
        self.in_memory = bool(cfg.data.in_memory and in_memory(train_data))
        if self.in_memory:
            images, labels = train_data.tensors()
            self.memory = InMemoryBatches(images, labels, self.batch_size, transform=None, shuffle=True,
                                          drop_last=True, seed=tc.seed, rank=rank, world_size=world,
                                          device=device, return_indices=True)
            self.steps_per_epoch, n = len(self.memory), images.shape[0]
        else:
            pin = cfg.data.pin_memory if cfg.data.pin_memory is not None else device.type == "cuda"
            self.loader = build_loader(DictDataset(train_data, captions=self.captions, crops=main.crops,
                                                   seed=tc.seed), self.batch_size,
                                       shuffle=True, collate_fn=collate_dicts, num_workers=cfg.data.num_workers,
                                       pin_memory=pin, drop_last=True, seed=tc.seed, distributed=world > 1,
                                       rank=rank, world_size=world)
            self.loader.sampler.with_epoch = True  # views a pure function of (seed, epoch, index)
            self.steps_per_epoch, n = self.loader.sampler.num_samples // self.batch_size, len(train_data)
        if self.steps_per_epoch < 1:
            raise ValueError(f"train.batch_size={self.batch_size} x {world} process(es) is larger than "
                             f"the {n} training images: not one batch per epoch")
        self.extra: dict[str, tuple[StreamSpec, ClassBalancedIndices]] = {}
        for name, spec in streams.items():
            if name == "main":
                continue
            if spec.sampler != "class_balanced":
                raise ValueError(f"stream {name!r}: extra streams use sampler='class_balanced', got {spec.sampler!r}")
            self.extra[name] = (spec, ClassBalancedIndices(train_data, spec, name=name, seed=tc.seed, rank=rank,
                                                           world_size=world))

    def stream_batch(self, name: str, step: int) -> dict:
        """The batch of extra stream ``name`` at ``step``."""
        spec, sampler = self.extra[name]
        idx = sampler.indices(step)
        if self.in_memory:
            idx_d = idx.to(self.memory.images.device)
            return memory_batch(self.data, self.memory.images.index_select(0, idx_d),
                                self.memory.labels.index_select(0, idx_d), idx, captions=spec.captions)
        ds = DictDataset(self.data, captions=spec.captions, crops=spec.crops, seed=mix_seed(self.cfg.train.seed,
                                                                                             zlib.crc32(name.encode())))
        return collate_dicts([ds[(i, step)] for i in idx.tolist()])

    def raw(self, start_step: int) -> Iterator[dict]:
        """The main stream's batch dicts of steps ``start_step, start_step + 1, ...``."""
        epoch, start = divmod(start_step, self.steps_per_epoch)
        while True:
            if self.in_memory:
                for images, labels, idx in self.memory.batches(epoch, start):
                    yield memory_batch(self.data, images, labels, idx, captions=self.captions)
            else:
                set_epoch(self.loader, epoch, start)
                yield from self.loader
            epoch, start = epoch + 1, 0

    def close(self) -> None:
        """Stop the main stream's loader workers now. They persist between epochs, and a finished run
        left them to the garbage collector: idle processes after ``pretrain`` returns, each later
        shut down with a join that can wait seconds."""
        it = getattr(getattr(self, "loader", None), "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
            self.loader._iterator = None

    def __call__(self, start_step: int) -> Iterator[dict]:
        step = start_step
        for batch in self.raw(start_step):
            for name in self.extra:
                batch[name] = self.stream_batch(name, step)
            batch = to_device(batch, self.device)
            g = torch.Generator().manual_seed(mix_seed(self.cfg.train.seed, step, self.rank))
            yield to_device(self.method.prepare_batch(batch, g), self.device)
            step += 1
