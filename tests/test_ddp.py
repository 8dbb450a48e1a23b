"""The trainer on 2 gloo processes with per-process batch B equals one process with batch 2B."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from visrep.config import Config, OptimConfig, TrainConfig
from visrep.methods.base import DataInfo, Method

STEPS, B = 6, 8


@dataclass
class ToyConfig:
    name: Literal["toy"] = "toy"


class Data:
    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return self.images.shape[0]

    def tensors(self):
        return self.images, self.labels


class Toy(Method):
    """A loss that is a mean over the batch: DDP's gradient average equals the 2B gradient."""

    def __init__(self):
        super().__init__(Config(method=ToyConfig()), DataInfo(in_chans=1, image_size=4, num_classes=4))
        torch.manual_seed(7)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        self.target = nn.Linear(16, 4)
        self.target.requires_grad_(False)
        self.hook_calls = 0

    def prepare_batch(self, batch, generator):
        return {**batch, "image": batch["image"].float() / 255}

    def training_step(self, batch, step):
        x, y = batch["image"], batch["label"]
        ce = F.cross_entropy(self.encoder(x), y)
        return {"loss": ce, "loss_ce": ce.detach()}

    def after_optimizer_step(self, step):
        self.hook_calls += 1


def make_cfg(out_dir: str, batch_size: int) -> Config:
    return Config(method=ToyConfig(), optim=OptimConfig(lr=5e-2, start_lr=1e-2, warmup_epochs=0.25),
                  train=TrainConfig(epochs=10, max_steps=STEPS, batch_size=batch_size, out_dir=out_dir,
                                    ckpt_every=0, log_every=1, progress=False, device="cpu", threads=1, seed=1))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from visrep import distributed as D
    from visrep.engine.trainer import train

    method = Toy()
    try:
        res = train(make_cfg(out_dir, B), method, Data())
        torch.save({"losses": res.losses, "params": method.state_dict(), "hook_calls": method.hook_calls},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.cleanup()



@pytest.mark.ddp
def test_two_processes_equal_one_process_on_double_batch(tmp_path, free_port):
    from visrep.engine.trainer import train

    # the single process first: it also imports everything the forked children will use
    single = Toy()
    res = train(make_cfg(str(tmp_path / "single"), 2 * B), single, Data())
    assert res.step == STEPS

    ddp_dir = str(tmp_path / "ddp")
    os.makedirs(ddp_dir)
    # fork: the children reuse the imports of this process (spawn re-imports torch: ~10 s each here);
    # they train with 1 thread, so no OpenMP pool is inherited mid-use.
    mp.start_processes(_worker, args=(2, free_port, ddp_dir), nprocs=2, join=True, start_method="fork")

    for rank in range(2):
        out = torch.load(os.path.join(ddp_dir, f"rank{rank}.pt"))
        assert out["hook_calls"] == STEPS
        # logged losses are the mean over processes = the loss on the 2B batch
        assert out["losses"] == pytest.approx(res.losses, abs=1e-6)
        for k, v in single.state_dict().items():
            assert torch.allclose(out["params"][k], v, atol=1e-6), k
    # the run's checkpoint is written once, by rank 0, and knows the world size
    ck = torch.load(os.path.join(ddp_dir, "last.pt"))
    assert ck["world_size"] == 2 and ck["step"] == STEPS and len(ck["rng"]) == 2
