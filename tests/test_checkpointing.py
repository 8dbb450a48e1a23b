"""Activation checkpointing (``model.grad_checkpointing``) changes memory, never the numbers."""
from __future__ import annotations

import pytest
import torch

from visrep.config import load_config
from visrep.methods import DataInfo, Step, build_method


@pytest.mark.parametrize("name", ["ijepa", "stop", "iwm"])
def test_checkpointed_step_equals_plain_step(name):
    grads = []
    for ckpt in (False, True):
        cfg = load_config(None, [f"method.name={name}", "data.image_size=16", "model.patch_size=4",
                                 "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "method.pred_emb_dim=16",
                                 "method.pred_depth=2", "method.min_keep=2", f"model.grad_checkpointing={ckpt}"])
        torch.manual_seed(0)
        m = build_method(cfg, DataInfo(in_chans=3, image_size=16, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3))
        assert m.encoder.grad_checkpointing is ckpt and m.predictor.grad_checkpointing is ckpt
        images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        batch = m.prepare_batch({"image": images, "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4)},
                                torch.Generator().manual_seed(2))
        torch.manual_seed(3)  # StoP draws its noise in the step
        loss = m.training_step(batch, Step(step=0, epoch=0, total_steps=10, steps_per_epoch=10))["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and len(g0) == len(g1) > 0
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
