"""CLIP / SigLIP: one training step of ours equals one open_clip training step (kinds clip_step, siglip_step).

The fixtures (``tests/fixtures/generate/clip_step.py``) run ``open_clip_train.train.train_one_epoch`` on one
batch through tiny ``open_clip.model.CLIP`` towers with ``ClipLoss`` / ``SigLipLoss``, AdamW with open_clip's
weight-decay exclusion, and the logit-scale clamp to [0, ln 100] after the step. Here our method is built from
the sidecar's config (``visrep.methods.clip``), loaded with the official weights (``visrep.hub``'s
``clip_vision_state`` / ``clip_text_state`` key mapping), and stepped the way the trainer does
(``forward_backward``, ``build_optimizer`` over ``param_groups()``, ``apply_schedules``, ``apply_update``, whose
``after_optimizer_step`` clamps the logit scale). Compared: the normalised features, the logit scale / bias, every
loss term and the total, every parameter's gradient, and every parameter after the step.

The fixtures' text vocabulary is tiny (ids < ``vocab_size``); our text tower has the BPE tokenizer's vocabulary,
so the fixture's embedding rows are loaded into its first rows and the others (zero) must stay zero and get no
gradient.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.config import OptimConfig, build_config
from visrep.engine.step import apply_update, forward_backward
from visrep.hub import clip_text_state, clip_vision_state
from visrep.methods import DataInfo, Step, build_method
from visrep.optim import apply_schedules, build_optimizer

_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def ours_of(official: str, value: torch.Tensor) -> str:
    """Our parameter name of an official open_clip ``CLIP`` key."""
    if official.startswith("visual."):
        vstate, proj = clip_vision_state({official[len("visual."):]: value})
        return "image_projection" if proj is not None else "visual." + next(iter(vstate))
    if official.startswith(_TEXT):
        return "text." + next(iter(clip_text_state({official: value})))
    if official in ("logit_scale", "logit_bias"):
        return official
    raise KeyError(official)


def build_ours(fx):
    c = fx.config
    vc, tc = c["vision_cfg"], c["text_cfg"]
    assert c["quick_gelu"] and vc.get("mlp_ratio", 4.0) == tc.get("mlp_ratio", 4.0) == 4.0
    assert c["logit_scale_clamp"][0] == 0.0
    tree = {
        "method": dict(name=c["method"], embed_dim=c["embed_dim"], text_width=tc["width"], text_depth=tc["layers"],
                       text_heads=tc["heads"], context_length=tc["context_length"], act_layer="quick_gelu",
                       max_logit_scale=c["logit_scale_clamp"][1]),
        "data": dict(image_size=vc["image_size"]),
        "model": dict(patch_size=vc["patch_size"], embed_dim=vc["width"], depth=vc["layers"],
                      num_heads=vc["width"] // vc.get("head_width", 64), mlp_ratio=vc.get("mlp_ratio", 4.0)),
    }
    cfg = build_config(tree)
    info = DataInfo(in_chans=3, image_size=vc["image_size"], mean=(0.0,) * 3, std=(1.0,) * 3)
    torch.manual_seed(0)
    method = build_method(cfg, info).double()
    params = dict(method.named_parameters())
    names = {}
    with torch.no_grad():
        for off, value in fx.prefixed("state.").items():
            if off == "attn_mask":
                continue
            name = ours_of(off, value)
            p = params[name]
            if off == "token_embedding.weight":
                assert value.shape[0] <= p.shape[0]
                p.zero_()[:value.shape[0]] = value
            else:
                p.copy_(value.reshape(p.shape))
            names[off] = name
    assert set(names.values()) == set(params), f"{fx.name}: not loaded: {set(params) - set(names.values())}"
    return method, names


def _view(fx, key: str, ours: torch.Tensor) -> torch.Tensor:
    """Our tensor in the official layout (first rows of the token embedding)."""
    want = fx.tensors[key]
    if key.endswith("token_embedding.weight"):
        return ours[:want.shape[0]]
    return ours.reshape(want.shape)


@pytest.mark.parametrize("path", fixtures_of_kind("clip_step", "siglip_step"))
def test_clip_siglip_step(path):
    fx = load_fixture(path)
    c = fx.config
    method, names = build_ours(fx)
    assert type(method).__name__.lower() == c["method"]
    opt_cfg = c["optimizer"]
    assert opt_cfg["name"] == "AdamW"
    ocfg = OptimConfig(name="adamw", lr=opt_cfg["lr"], weight_decay=opt_cfg["weight_decay"],
                       betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"])
    optimizer = build_optimizer(method.param_groups(), ocfg)
    apply_schedules(optimizer, opt_cfg["lr"], opt_cfg["weight_decay"], step=0)
    # the official weight-decay exclusion, group by group
    params = dict(method.named_parameters())
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for off, name in names.items():
        official_decays = off not in c["optimizer"]["weight_decay_excluded"]
        assert (id(params[name]) in decayed) == official_decays, f"{fx.name}: weight decay of {name} ({off})"

    info = Step(step=0, epoch=0, total_steps=1, steps_per_epoch=1, lr=opt_cfg["lr"], wd=opt_cfg["weight_decay"])
    batch = {"image": fx.tensors["in.image"].clone(), "text": fx.tensors["in.text"].clone()}
    out = forward_backward(method, batch, info)

    with torch.no_grad():  # the step's features, from the same weights
        image = F.normalize(method.pooled_features(method.visual(batch["image"])) @ method.image_projection, dim=-1)
        fx.assert_close("out.image_features", image)
        fx.assert_close("out.text_features", method.encode_tokens(batch["text"])["zt"])
    fx.assert_close("out.logit_scale", out["logit_scale"])
    if "out.logit_bias" in fx.tensors:
        fx.assert_close("out.logit_bias", method.logit_bias.detach())
    terms = fx.prefixed("out.loss.")
    assert terms, f"{fx.name}: no loss terms"
    for term in terms:  # open_clip's only term for these losses is the contrastive loss = our total
        fx.assert_close(f"out.loss.{term}", out.get(term, out["loss"]).detach())
    fx.assert_close("out.loss", out["loss"].detach())

    for off, name in names.items():
        key = f"out.grad.{off}"
        g = params[name].grad
        assert key in fx.tensors, f"{fx.name}: no official gradient for {off}"
        assert g is not None, f"{fx.name}: {name} has no gradient"
        fx.assert_close(key, _view(fx, key, g))
        if off == "token_embedding.weight":
            assert not g[fx.tensors[key].shape[0]:].any(), "gradient in token rows the fixture never uses"

    apply_update(method, optimizer, info)
    for off, name in names.items():
        key = f"out.param.{off}"
        p = params[name].detach()
        fx.assert_close(key, _view(fx, key, p))
        if off == "token_embedding.weight":
            assert not p[fx.tensors[key].shape[0]:].any(), "unused token rows moved"
