"""Collectives with gradients (visrep/distributed.py): identity on one process; on 2 gloo processes
each rank's gradient is W x its share of the gradient of the mean loss, which DDP's 1/W average turns
into exactly the single-process gradient on the doubled batch."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from visrep import distributed as D
from visrep.losses import sinkhorn, sinkhorn_logits

B, DIM, WORLD = 3, 5, 2


def contrastive(x: torch.Tensor, group=None) -> torch.Tensor:
    """InfoNCE of local rows against every process's rows (CLIP-style negatives)."""
    everyone = D.all_gather(x, group)
    logits = x @ everyone.T / 0.1
    target = torch.arange(x.shape[0]) + D.rank_in(group) * x.shape[0]
    return F.cross_entropy(logits, target)


def centred(x: torch.Tensor, group=None) -> torch.Tensor:
    """A batch statistic over every process (ME-MAX / centering style)."""
    n = D.all_reduce(torch.tensor(float(x.shape[0]), dtype=x.dtype), group=group)
    mean = D.all_reduce(x.sum(0), group=group) / n
    return (x - mean).pow(2).mean() + mean.pow(3).sum()


def data() -> torch.Tensor:
    return torch.randn(WORLD * B, DIM, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_identity_on_one_process():
    x = data()
    assert D.all_gather(x) is x and D.all_reduce(x) is x and D.all_reduce(x, "mean") is x
    assert D.rank_in() == 0 and D.world_in() == 1
    with pytest.raises(ValueError, match="op"):
        D.all_reduce(x, "min")


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name, fn in (("contrastive", contrastive), ("centred", centred)):
            x = data()[rank * B:(rank + 1) * B].clone().requires_grad_(True)
            loss = fn(x)
            loss.backward()
            mean_loss = D.all_reduce(loss.detach(), "mean")
            results[name] = (mean_loss, x.grad / WORLD)   # DDP's 1/W average
        x = data()[rank * B:(rank + 1) * B]
        results["sinkhorn"] = (sinkhorn(x.exp(), 3), sinkhorn_logits(x * 30, 3))
        gathered = D.all_gather(torch.full((2, 1), float(rank)))
        mean = D.all_reduce(torch.tensor([float(rank)]), "mean")
        torch.save({"results": results, "gathered": gathered, "mean": mean}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_two_processes_equal_one_process_double_batch(tmp_path, free_port):
    single = {}
    for name, fn in (("contrastive", contrastive), ("centred", centred)):
        x = data().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        single[name] = (loss.detach(), x.grad)
    mp.start_processes(_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    x = data()
    balanced = (sinkhorn(x.exp(), 3), sinkhorn_logits(x * 30, 3))
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for got, want in zip(out["results"].pop("sinkhorn"), balanced, strict=True):  # Sinkhorn sums across processes
            torch.testing.assert_close(got, want[rank * B:(rank + 1) * B], rtol=1e-6, atol=1e-7)
        assert out["gathered"].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
        assert out["mean"].item() == 0.5
        for name, (loss, grad) in single.items():
            got_loss, got_grad = out["results"][name]
            torch.testing.assert_close(got_loss, loss, rtol=1e-12, atol=1e-12, msg=name)
            torch.testing.assert_close(got_grad, grad[rank * B:(rank + 1) * B], rtol=1e-10, atol=1e-12, msg=name)
