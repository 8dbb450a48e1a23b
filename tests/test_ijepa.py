"""I-JEPA set-up as the official training path (facebookresearch/ijepa ``src/helper.py``
``init_model`` / ``init_opt``) and the official recipe's mask generator. No fixture needed."""
from __future__ import annotations

import math

import pytest
import torch

from visrep.config import load_config
from visrep.methods import DataInfo, build_method

INFO = DataInfo(in_chans=1, image_size=28, num_classes=10, mean=(0.5,), std=(0.5,))
SMALL = ["method.name=ijepa", "data.image_size=28", "model.patch_size=7", "model.embed_dim=192", "model.depth=6",
         "model.num_heads=3", "method.pred_emb_dim=96", "method.pred_depth=4", "method.min_keep=2"]


def build(*overrides):
    """I-JEPA with the method's defaults (the official ones), no recipe."""
    torch.manual_seed(0)
    return build_method(load_config(None, [*SMALL, *overrides]), INFO)


def test_every_linear_redrawn_with_std_002_as_the_official_init_model():
    """init_model re-draws every nn.Linear with trunc_normal(0.02): the residual rescale is undone."""
    m = build()
    for module in (m.encoder, m.predictor):
        for name, p in module.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                assert p.std().item() == pytest.approx(0.02, rel=0.15), name
            if name.endswith("bias") and ".norm" not in name and "norm1" not in name and "norm2" not in name:
                assert torch.count_nonzero(p) == 0, name
    last = m.encoder.blocks[-1]
    assert last.attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.15)


def test_rescale_init_option_keeps_the_residual_rescale():
    m = build("method.rescale_init=true")
    depth = len(m.encoder.blocks)
    want = 0.02 / math.sqrt(2.0 * depth)
    assert m.encoder.blocks[-1].attn.proj.weight.std().item() == pytest.approx(want, rel=0.15)
    assert m.encoder.blocks[-1].mlp.fc2.weight.std().item() == pytest.approx(want, rel=0.15)


def test_weight_decay_groups_as_official_init_opt():
    """Decayed: every parameter without 'bias' in its name and not 1-D (the predictor's mask_token too)."""
    m = build()
    groups = m.param_groups()
    decayed = {id(p) for g in groups if not g.get("wd_exclude") for p in g["params"]}
    excluded = {id(p) for g in groups if g.get("wd_exclude") for p in g["params"]}
    for module in (m.encoder, m.predictor):
        for name, p in module.named_parameters():
            if not p.requires_grad:  # fixed sin-cos tables: no gradient, no optimizer state
                assert id(p) not in decayed | excluded, name
                continue
            official_decay = "bias" not in name and p.ndim != 1
            assert (id(p) in decayed) == official_decay, name
            assert (id(p) in excluded) != official_decay, name
    assert id(m.predictor.mask_token) in decayed
    assert not any(id(p) in decayed | excluded for p in m.target_encoder.parameters())


def test_predictor_mlp_ratio_is_4_whatever_the_encoder():
    m = build("model.mlp_ratio=2.0")
    assert m.encoder.blocks[0].mlp.fc1.out_features == 2 * 192
    assert m.predictor.predictor_blocks[0].mlp.fc1.out_features == 4 * 96


def test_official_h14_recipe_never_touches_the_last_row_or_column():
    """The reference draws block corners in [0, H - h): no block reaches row/column H - 1."""
    from visrep.config import resolve_config
    from visrep.data.masks import MultiBlockMaskCollator

    cfg = load_config(resolve_config("ijepa/imagenet_vit_h14"))
    m = cfg.method
    assert m.mask_mode == "official"
    coll = MultiBlockMaskCollator(input_size=cfg.data.image_size, patch_size=cfg.model.patch_size,
                                  enc_mask_scale=m.enc_mask_scale, pred_mask_scale=m.pred_mask_scale,
                                  aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks, npred=m.num_pred_masks,
                                  min_keep=m.min_keep, allow_overlap=m.allow_overlap, mode=m.mask_mode)
    side = cfg.data.image_size // cfg.model.patch_size
    assert coll.grid == (side, side) == (16, 16)
    torch.manual_seed(0)
    for step in range(30):
        coll.set_step(step)
        enc, pred = coll.sample_boolean_masks(8)
        for masks in (enc, pred):
            assert not masks[..., side - 1, :].any() and not masks[..., :, side - 1].any()
