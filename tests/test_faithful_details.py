"""The smaller faithfulness items of issue 18 (items 4 and 5), each against the official behaviour.

* IWM's context is the complement of the targets (the paper), cut to the batch's shortest by a random
  subset; I-JEPA's capped block stays available (``method.context=block``) and is much smaller.
* MAE initialises as the official ``initialize_weights``: xavier_uniform for every Linear, no depth rescale.
* DiT: guidance on the first 3 channels (official ``forward_with_cfg``), float32 training under autocast.
* PAWS: a ResNet's downsample BN scales are decayed and LARS-adapted (official ``init_opt``).
* Supervised: RandAugment runs on the file-dataset path too.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from visrep.config import load_config
from visrep.data.masks import MultiBlockMaskCollator
from visrep.methods import build_method
from visrep.methods.base import DataInfo, Step


def tiny(name: str, *overrides: str):
    return load_config(f"visrep/configs/{name}/tiny.yaml", ["train.out_dir=/tmp/unused", *overrides])


# -- IWM's context ---------------------------------------------------------------------------------
def iwm_collator(context: str) -> MultiBlockMaskCollator:
    """IWM's masks at 224 px / 16 px patches (14 x 14), as visrep/configs/iwm/imagenet_vit_b16_*.yaml."""
    return MultiBlockMaskCollator(input_size=224, patch_size=16, enc_mask_scale=(1.0, 1.0),
                                  pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                  min_keep=10, context=context)


def context_sizes(context: str, steps: int = 12, batch: int = 128) -> tuple[float, float]:
    """Mean context size per sample, and after the cut to each batch's shortest (what the encoder sees)."""
    c = iwm_collator(context)
    torch.manual_seed(0)
    per_sample, kept = [], []
    for s in range(steps):
        c.set_step(s)
        enc, _ = c.sample_boolean_masks(batch)
        n = enc.flatten(2).sum(-1)[:, 0].float()
        per_sample.append(n.mean().item())
        kept.append(n.min().item())
    return sum(per_sample) / steps, sum(kept) / steps


def test_iwm_context_is_the_complement_of_the_targets():
    c = iwm_collator("complement")
    torch.manual_seed(0)
    c.set_step(3)
    enc, pred = c.sample_boolean_masks(32)
    assert enc.shape == (32, 1, 14, 14)
    assert torch.equal(enc[:, 0], ~pred.any(1))          # every patch outside the targets, nothing else
    torch.manual_seed(0)
    c.set_step(3)
    masks_enc, masks_pred = c.sample(32)             # the same masks, then the cut
    k = int(enc.flatten(2).sum(-1).min())
    assert masks_enc[0].shape == (32, k)
    flat_pred = pred.flatten(2).any(1)
    for i in range(32):
        kept = masks_enc[0][i]
        assert torch.equal(kept, kept.sort().values) and len(set(kept.tolist())) == k
        assert not flat_pred[i, kept].any()              # never a target patch
    # the cut keeps a random subset, not the first k row-major patches (which would drop the image's bottom)
    first_k = [torch.nonzero(enc[i, 0].flatten())[:k, 0] for i in range(32)]
    assert sum(not torch.equal(masks_enc[0][i], first_k[i]) for i in range(32)) > 16


def test_iwm_default_context_size_against_the_block():
    """Measured at 14 x 14, batch 128: ~104 patches per sample, ~71 after the cut (I-JEPA's 13 x 13-capped
    block: ~81 and ~51)."""
    comp, comp_kept = context_sizes("complement")
    block, block_kept = context_sizes("block")
    assert 95 < comp < 115 and 60 < comp_kept < 85, (comp, comp_kept)
    assert block_kept < 60 and comp_kept > block_kept + 10, (block, block_kept)
    cfg = tiny("iwm")
    iwm = build_method(cfg, DataInfo(in_chans=3, image_size=cfg.data.image_size, num_classes=4))
    assert iwm.cfg.context == "complement" and iwm.mask_collator.context == "complement"
    assert build_method(tiny("ijepa"), DataInfo(in_chans=3, image_size=16)).mask_collator.context == "block"


def test_complement_context_is_refused_where_undefined():
    with pytest.raises(ValueError, match="complement"):
        MultiBlockMaskCollator(input_size=64, patch_size=8, nenc=2, context="complement")
    with pytest.raises(ValueError, match="complement"):
        MultiBlockMaskCollator(input_size=64, patch_size=8, mode="official", context="complement")


# -- MAE's initialisation ---------------------------------------------------------------------------
def _linears(mae):
    return [(n, m) for part in ("encoder", "decoder") for n, m in getattr(mae, part).named_modules()
            if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("init", ["xavier", "trunc_normal"])
def test_mae_initialises_as_the_official_code(init):
    torch.manual_seed(0)
    mae = build_method(tiny("mae", f"method.init={init}", "model.embed_dim=64"), DataInfo(in_chans=3, image_size=16))
    lin = _linears(mae)
    assert len(lin) > 8
    for name, m in lin:
        fan_out, fan_in = m.weight.shape
        std = m.weight.std().item()
        if init == "xavier":   # xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))
            a = math.sqrt(6.0 / (fan_in + fan_out))
            assert m.weight.abs().max() <= a + 1e-7, name
            assert abs(std / (a / math.sqrt(3)) - 1) < 0.2, (name, std, a / math.sqrt(3))
            assert m.bias is None or not m.bias.any(), name
        else:                  # the former: trunc_normal(0.02), residual outputs rescaled by depth
            assert std < 0.021, (name, std)
    blocks = mae.encoder.blocks
    ratio = blocks[-1].attn.proj.weight.std() / blocks[0].attn.proj.weight.std()
    # no depth rescale (official) / block i divided by sqrt(2 i)
    assert abs(ratio - (1.0 if init == "xavier" else 1 / math.sqrt(len(blocks)))) < 0.15, ratio


# -- DiT -------------------------------------------------------------------------------------------
def _dit(*overrides, in_chans=3):
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = build_method(tiny("diffusion", *overrides), DataInfo(in_chans=in_chans, image_size=8, num_classes=6))
    with torch.no_grad():   # adaLN-Zero starts at zero: perturb so that the input and the label matter
        for p in (*m.dit.parameters(), *m.ema.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("guided", [3, None])
def test_dit_guides_the_first_three_channels(guided):
    m = _dit(f"method.guided_channels={'null' if guided is None else guided}", in_chans=4)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([5, 300, 900]), torch.tensor([0, 2, 5])
    cond = m.ema(x, t, y)[:, :4]
    uncond = m.ema(x, t, torch.full_like(y, m.dit.null_class))[:, :4]
    got = m.guided_eps(x, t, y, 3.0)
    full = uncond + 3.0 * (cond - uncond)
    torch.testing.assert_close(got[:, :3], full[:, :3], rtol=1e-5, atol=1e-5)
    # official: the 4th latent channel keeps the conditional prediction; null: guided like the others
    torch.testing.assert_close(got[:, 3], (cond if guided == 3 else full)[:, 3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cond[:, 3], full[:, 3], atol=1e-3)


def test_dit_trains_in_float32_under_autocast():
    losses = {}
    for precision in ("fp32", "autocast"):
        m = _dit(f"method.precision={precision}")
        g = torch.Generator().manual_seed(1)
        batch = m.prepare_batch({"image": torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=g),
                                 "label": torch.arange(8) % 6, "index": torch.arange(8)}, g)
        step = Step(0, 0, 10, 5)
        ref = m.training_step(batch, step)["loss"].detach()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses[precision] = (m.training_step(batch, step)["loss"].detach(), ref)
    got, ref = losses["fp32"]
    assert got.dtype == torch.float32 and torch.equal(got, ref)          # the official fp32 step
    got, ref = losses["autocast"]
    assert abs(got - ref) / ref > 1e-5                                    # bf16 differs


# -- PAWS's parameter groups -----------------------------------------------------------------------
def _group_of(groups, p):
    (g,) = [g for g in groups if any(q is p for q in g["params"])]
    return g


def test_paws_resnet_downsample_bn_is_decayed_and_adapted():
    cfg = tiny("paws", "method.backbone=resnet18", "data.image_size=32", "method.mc_size=16")
    paws = build_method(cfg, DataInfo(in_chans=3, image_size=32, num_classes=4))
    groups = paws.param_groups()
    named = dict(paws.named_parameters())
    down = [n for n in named if "downsample.1.weight" in n]
    assert down
    for n in down:                    # official: no 'bias' / 'bn' in the name -> weight decay and LARS
        assert not _group_of(groups, named[n]).get("wd_exclude", False), n
    for n, p in named.items():
        if "bias" in n or "bn" in n:
            assert _group_of(groups, p)["wd_exclude"], n
    vit = build_method(tiny("paws"), DataInfo(in_chans=3, image_size=16, num_classes=4))
    vgroups, vnamed = vit.param_groups(), dict(vit.named_parameters())
    assert _group_of(vgroups, vnamed["encoder.blocks.0.norm1.weight"])["wd_exclude"]   # the ViT: 1-D excluded


# -- Supervised: RandAugment on the file path --------------------------------------------------------
def test_supervised_randaugment_runs_on_file_dataset_batches(monkeypatch):
    cfg = tiny("supervised", "method.randaugment=2")
    m = build_method(cfg, DataInfo(in_chans=3, image_size=16, num_classes=5))
    calls = []
    original = m.randaugment

    def spy(images, generator):
        calls.append(images.shape)
        return original(images, generator)

    monkeypatch.setattr(m, "randaugment", spy)
    g = torch.Generator().manual_seed(0)
    crops = torch.rand(4, 1, 3, 16, 16, generator=g)          # the loader's per-sample crops (float [0, 1])
    batch = m.prepare_batch({"crops": {"image": crops}, "label": torch.arange(4), "index": torch.arange(4)},
                            torch.Generator().manual_seed(1))
    assert calls and calls[0][0] == 4
    assert not torch.allclose(batch["image"], m.normalize(crops[:, 0]), atol=1e-3)
