"""I-JEPA and StoP through our *method* (``training_step`` + the engine's step), on the official
train-loss fixtures: the loss and every gradient equal the official ``train_step``'s, and one
``apply_update`` moves the target encoder to ``m * target + (1 - m) * encoder`` (the encoder after the
optimizer step, ``m`` the official linear schedule at that step).

``tests/parity/test_ijepa_loss_parity.py`` / ``test_stop_parity.py`` check the loss *function*
(``ijepa_loss``) on the same fixtures; this test checks how the method composes it: which batch
entries reach which network, the StoP noise layout of ``prepare_batch``, ``target_blocks`` /
``pairing`` from the config, and the EMA hook. Generic over every ``ijepa_train_loss`` and
``stop_train_loss`` fixture in ``PARITY_DIR`` (shapes and options from the sidecar and the state).
"""
from __future__ import annotations

import re

import pytest
import torch

from parity.parity_helpers import fixtures_of_kind, load_fixture
from visrep.config import load_config
from visrep.engine.step import apply_update, forward_backward
from visrep.methods import DataInfo, Step, build_method

STEP = Step(step=3, epoch=0, total_steps=10, steps_per_epoch=10)


def _int(pattern: str, text: str) -> int:
    return int(re.search(pattern, text).group(1))


def _depth(state: dict, prefix: str) -> int:
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))


def build_from_fixture(fx):
    """Our I-JEPA / StoP method with the fixture's shapes, its state loaded, in float64."""
    enc, pred = fx.prefixed("state.encoder."), fx.prefixed("state.predictor.")
    patch_w = enc["patch_embed.proj.weight"]                       # [D, C, p, p]
    embed_dim, in_chans, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[-1]
    image_size = fx.tensors["in.imgs"].shape[-1]
    mlp_ratio = enc["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    stop = fx.kind == "stop_train_loss"
    if stop:
        init = fx.config["init_model"]
        heads = _int(r"num_heads=(\d+)", init[init["model_name"]])
        pred_heads = _int(r"num_heads=(\d+)", init["resulting_predictor"])
    else:
        heads, pred_heads = fx.config["encoder_kwargs"]["num_heads"], fx.config["predictor_kwargs"]["num_heads"]
    mc = fx.config["mask_collator"]
    overrides = [
        f"method.name={'stop' if stop else 'ijepa'}", f"data.image_size={image_size}", f"model.patch_size={patch}",
        f"model.embed_dim={embed_dim}", f"model.depth={_depth(enc, 'blocks.')}", f"model.num_heads={heads}",
        f"model.mlp_ratio={mlp_ratio}", f"method.pred_emb_dim={pred['predictor_embed.weight'].shape[0]}",
        f"method.pred_depth={_depth(pred, 'predictor_blocks.')}", f"method.pred_num_heads={pred_heads}",
        f"method.num_enc_masks={mc['nenc']}", f"method.num_pred_masks={mc['npred']}",
        f"method.min_keep={mc['min_keep']}",
        "method.enc_mask_scale={},{}".format(*mc["enc_mask_scale"]),
        "method.pred_mask_scale={},{}".format(*mc["pred_mask_scale"]),
        "method.aspect_ratio={},{}".format(*mc["aspect_ratio"]),
    ]
    if stop:
        overrides += [f"method.stop_sigma={fx.config['init_model']['noise_var']}",
                      f"method.target_blocks={fx.config['target_blocks']}", "method.pairing=rows"]
    elif fx.config.get("loss") == "l2":
        overrides.append("method.loss=l2")
    info = DataInfo(in_chans=in_chans, image_size=image_size, num_classes=2, mean=(0.0,) * in_chans,
                    std=(1.0,) * in_chans)
    torch.manual_seed(0)
    method = build_method(load_config(None, overrides), info).double().train()
    method.encoder.load_state_dict(enc, strict=True)
    method.target_encoder.load_state_dict(fx.prefixed("state.target_encoder."), strict=True)
    method.predictor.load_state_dict(pred, strict=True)
    return method


def batch_from_fixture(fx) -> dict:
    """The prepared batch ``training_step`` reads: normalised images and masks (StoP: its noise in the
    layout ``prepare_batch`` writes, ``[B, n_ctx, K, width]`` per target block)."""
    masks_enc = fx.listed("in.masks_enc")
    batch = {"image": fx.tensors["in.imgs"], "masks_enc": masks_enc, "masks_pred": fx.listed("in.masks_pred")}
    if fx.kind == "stop_train_loss":
        b = fx.tensors["in.imgs"].size(0)
        # official rows (context mask, sample) -> ours per sample first
        batch["stop_noise"] = [n.view(len(masks_enc), b, *n.shape[1:]).transpose(0, 1)
                               for n in fx.listed("in.rng.noise")]
    return batch


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_train_loss", "stop_train_loss"))
def test_training_step_and_ema_match_the_official_step(path):
    fx = load_fixture(path)
    method = build_from_fixture(fx)
    target_before = {k: v.clone() for k, v in method.target_encoder.named_parameters()}
    out = forward_backward(method, batch_from_fixture(fx), STEP)
    fx.assert_close("out.loss", out["loss"].detach())

    checked = 0
    for name in ("encoder", "predictor"):
        for pname, p in getattr(method, name).named_parameters():
            key = f"out.grad.{name}.{pname}"
            if key in fx.tensors:
                assert p.grad is not None, f"{key}: no gradient"
                fx.assert_close(key, p.grad)
                checked += 1
            elif p.requires_grad:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{key}: unexpected gradient"
    assert checked == len([k for k in fx.tensors if k.startswith("out.grad.")])
    assert all(p.grad is None for p in method.target_encoder.parameters())

    # one optimizer step over the method's own parameter groups, then the method's EMA hook
    encoder_before = {k: v.detach().clone() for k, v in method.encoder.named_parameters()}
    optimizer = torch.optim.SGD([{"params": g["params"]} for g in method.param_groups()], lr=0.05)
    apply_update(method, optimizer, STEP)
    m0, m1 = method.cfg.ema
    m = m0 + STEP.step * (m1 - m0) / STEP.total_steps       # official momentum_scheduler, i = step
    online = dict(method.encoder.named_parameters())
    moved = 0
    for k, t in method.target_encoder.named_parameters():
        if online[k].requires_grad:
            moved += int(not torch.equal(online[k].detach(), encoder_before[k]))
        want = m * target_before[k] + (1 - m) * online[k].detach()
        torch.testing.assert_close(t.detach(), want, rtol=0, atol=1e-13, msg=lambda s, k=k: f"EMA of {k}: {s}")
    assert moved > 0, "the optimizer step changed no encoder weight"
