"""I-JEPA on 2 gloo processes x batch B gives the loss and gradients of 1 process x batch 2B."""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from visrep.data.masks import MultiBlockMaskCollator
from visrep.methods.ijepa import ijepa_loss
from visrep.models import Predictor, VisionTransformer

B = 4


class Objective(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
        self.target = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
        self.target.requires_grad_(False)
        self.predictor = Predictor((4, 4), 32, 16, depth=1, num_heads=2)
        self.double()

    def forward(self, imgs, masks_enc, masks_pred):
        return ijepa_loss(self.encoder, self.target, self.predictor, imgs, masks_enc, masks_pred)[0]


def inputs():
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(2 * B, 1, 16, 16, generator=g, dtype=torch.float64)
    torch.manual_seed(2)
    coll = MultiBlockMaskCollator(16, 4, npred=2, min_keep=2, pred_mask_scale=(0.1, 0.2))
    masks_enc, masks_pred = coll.sample(2 * B)
    return imgs, masks_enc, masks_pred


def loss_and_grads(model, imgs, masks_enc, masks_pred):
    loss = model(imgs, masks_enc, masks_pred)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = Objective()
        imgs, me, mp_ = inputs()
        half = slice(rank * B, (rank + 1) * B)
        ddp = DDP(model, broadcast_buffers=False)       # averages gradients over the 2 processes
        loss = ddp(imgs[half], [m[half] for m in me], [m[half] for m in mp_])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.save({"loss": mean_loss / world, "grads": {k: p.grad for k, p in model.named_parameters()}},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.ddp
def test_ijepa_two_processes_equal_one_process_double_batch(tmp_path, free_port):
    loss, grads = loss_and_grads(Objective(), *inputs())
    mp.start_processes(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(out["loss"], loss, atol=1e-12, rtol=1e-10)
        assert grads.keys() == {k for k, v in out["grads"].items() if v is not None}
        for k, g in grads.items():
            torch.testing.assert_close(out["grads"][k], g, atol=1e-12, rtol=1e-9, msg=k)
