"""The supervised (PiT / DeiT-recipe) ViT step composes its loss as the config says.

No official training-step code exists for PiT's supervised case, so the loss is recomputed here
independently of ``Supervised.training_step``: logits from the encoder's tokens (pooled as configured)
and the head, then ``torch.nn.functional.cross_entropy`` with ``label_smoothing``; with mixup / cutmix the
mixing weight is recovered from the mixed images themselves (timm's batch mode pairs image i with B-1-i)
and the loss is ``lam CE(y) + (1 - lam) CE(y flipped)``. Loss and every gradient must agree in float64
(to float32 rounding with mixing: timm's ``Mixup`` builds its targets in float32).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visrep.config import build_config
from visrep.methods import DataInfo, build_method
from visrep.methods.base import Step

K, B, SIZE = 5, 4, 8
INFO = DataInfo(in_chans=3, image_size=SIZE, num_classes=K, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
STEP = Step(step=0, epoch=0, total_steps=1, steps_per_epoch=1)


def build(pool="avg", **method):
    cfg = build_config({
        "method": {"name": "supervised", "pool": pool, **method},
        "data": {"image_size": SIZE},
        "model": {"patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2, "class_token": pool == "cls"},
        "train": {"batch_size": B},
    })
    torch.manual_seed(0)
    m = build_method(cfg, INFO).double().train()
    with torch.no_grad():  # away from the init, so that every weight (and the head bias) matters
        g = torch.Generator().manual_seed(1)
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return cfg, m


def reference_logits(m, x, pool):
    tokens = m.encoder(x)                                   # final-normed tokens
    feats = tokens[:, 0] if pool == "cls" else tokens[:, m.encoder.num_prefix:].mean(dim=1)
    return feats @ m.head.weight.T + m.head.bias


def grads_of(m, loss):
    params = [p for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def check(m, loss, ref, tol=1e-12):
    torch.testing.assert_close(loss, ref, rtol=tol, atol=tol)
    for a, b in zip(grads_of(m, loss), grads_of(m, ref)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=100 * tol, atol=tol)


def images_and_labels():
    g = torch.Generator().manual_seed(2)
    images = torch.rand(B, 3, SIZE, SIZE, generator=g, dtype=torch.float64)   # given as the views (crops)
    return images, torch.tensor([0, 3, 3, 4])


@pytest.mark.parametrize("pool,smoothing", [("avg", 0.1), ("cls", 0.0), ("avg", 0.3)])
def test_loss_is_label_smoothed_cross_entropy_of_the_logits(pool, smoothing):
    cfg, m = build(pool=pool, label_smoothing=smoothing)
    images, labels = images_and_labels()
    batch = m.prepare_batch({"crops": {"image": images[:, None]}, "label": labels, "index": torch.arange(B)},
                            torch.Generator().manual_seed(0))
    x = batch["image"]
    mean, std = torch.tensor(INFO.mean).view(1, 3, 1, 1), torch.tensor(INFO.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images - mean) / std)     # normalised once, not mixed
    out = m.training_step(batch, STEP)
    ref = F.cross_entropy(reference_logits(m, x, pool), labels, label_smoothing=smoothing)
    check(m, out["loss"], ref)
    acc = (reference_logits(m, x, pool).argmax(-1) == labels).double().mean()
    assert out["train_top1"] == acc


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_batches_weight_both_labels(kind):
    s = 0.1
    cfg, m = build(label_smoothing=s, mixup=0.8 if kind == "mixup" else 0.0, cutmix=1.0 if kind == "cutmix" else 0.0)
    images, labels = images_and_labels()
    batch = m.prepare_batch({"crops": {"image": images[:, None]}, "label": labels, "index": torch.arange(B)},
                            torch.Generator().manual_seed(5))
    xn = m.normalize(images)
    xf, xm = xn.flip(0), batch["image"]
    if kind == "mixup":
        d = xn - xf
        lam = ((xm - xf) * d).sum() / (d * d).sum()
        torch.testing.assert_close(xm, lam * xn + (1 - lam) * xf)
    else:
        box = (xm == xf) & (xm != xn)                          # pixels pasted from the partner image
        assert torch.equal(box, box[:1].expand_as(box))       # one box for the whole batch
        assert torch.equal(torch.where(box, xf, xn), xm)
        lam = 1 - box[0, 0].double().mean()
    assert 0 < lam < 1
    out = m.training_step(batch, STEP)
    logits = reference_logits(m, xm, "avg")
    ref = lam * F.cross_entropy(logits, labels, label_smoothing=s) + \
        (1 - lam) * F.cross_entropy(logits, labels.flip(0), label_smoothing=s)
    check(m, out["loss"], ref, tol=1e-6)  # timm's Mixup builds its soft targets in float32
