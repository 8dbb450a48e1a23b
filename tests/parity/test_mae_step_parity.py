"""Whole-step parity with the official MAE (facebookresearch/mae ``models_mae.py`` + ``main_pretrain.py``).

For every ``mae_step`` fixture: our MAE built from the sidecar config, loaded with the official weights
(official key names mapped here), fed the official images and the masking drawn from the official noise,
runs ``training_step`` + backward + one AdamW step through the engine's ``forward_backward`` /
``apply_update`` with our own parameter groups; the loss, the predictions at the masked tokens, the
mask, every parameter's gradient and every parameter after the step must match the official ones.
"""
from __future__ import annotations

import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture

FIXED = {"pos_embed", "decoder_pos_embed"}


def official_to_ours(name: str) -> str:
    """Official ``MaskedAutoencoderViT`` parameter name -> our ``MAE`` name."""
    for old, new in (("decoder_embed.", "decoder.predictor_embed."), ("decoder_blocks.", "decoder.predictor_blocks."),
                     ("decoder_norm.", "decoder.predictor_norm."), ("decoder_pred.", "decoder.predictor_proj.")):
        if name.startswith(old):
            return new + name[len(old):]
    if name == "mask_token":
        return "decoder.mask_token"
    if name == "decoder_pos_embed":
        return "decoder.predictor_pos_embed"
    return "encoder." + name


def build(fx):
    from visrep.config import build_config
    from visrep.methods import build_method
    from visrep.methods.base import DataInfo

    c, o = fx.config, fx.config["optimizer"]
    assert c["norm_layer"] == "partial(nn.LayerNorm, eps=1e-6)"  # our ViT and decoder use eps 1e-6
    cfg = build_config({
        "method": {"name": "mae", "mask_ratio": c["mask_ratio"], "decoder_dim": c["decoder_embed_dim"],
                   "decoder_depth": c["decoder_depth"], "decoder_heads": c["decoder_num_heads"],
                   "norm_pix_loss": c["norm_pix_loss"]},
        "data": {"image_size": c["img_size"]},
        "model": {"patch_size": c["patch_size"], "embed_dim": c["embed_dim"], "depth": c["depth"],
                  "num_heads": c["num_heads"], "mlp_ratio": c["mlp_ratio"], "class_token": True,
                  "pos_embed": "sincos"},
        "optim": {"name": "adamw", "lr": o["lr"], "start_lr": o["lr"], "final_lr": o["lr"],
                  "weight_decay": o["weight_decay"], "final_weight_decay": o["weight_decay"],
                  "betas": list(o["betas"]), "eps": o["eps"]},
    })
    info = DataInfo(in_chans=c["in_chans"], image_size=c["img_size"], mean=(0.0,) * c["in_chans"],
                    std=(1.0,) * c["in_chans"])
    method = build_method(cfg, info).double()
    state = {}
    for k, v in fx.prefixed("state.").items():
        if k == "decoder_pos_embed":  # official table has a [CLS] row (zeros: sin-cos with cls_token=True)
            assert torch.count_nonzero(v[:, 0]) == 0
            v = v[:, 1:]
        state[official_to_ours(k)] = v
    missing, unexpected = method.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if not k.startswith("normalize.")], missing
    return cfg, method


@pytest.mark.parametrize("path", fixtures_of_kind("mae_step"))
def test_mae_step_matches_official(path):
    from visrep.engine.step import apply_update, forward_backward
    from visrep.methods.base import Step
    from visrep.methods.mae import masking_from_noise
    from visrep.optim.factory import apply_schedules, build_optimizer

    fx = load_fixture(path)
    cfg, method = build(fx)
    method.train()
    imgs, noise = fx.tensors["in.imgs"], fx.tensors["in.rng.noise"]
    keep, masked = masking_from_noise(noise, cfg.method.mask_ratio)
    mask = torch.zeros(noise.shape, dtype=fx.tensors["out.mask"].dtype).scatter_(1, masked, 1.0)
    fx.assert_close("out.mask", mask)

    opt = build_optimizer(method.param_groups(), cfg.optim)
    apply_schedules(opt, cfg.optim.lr, cfg.optim.weight_decay)
    info = Step(step=0, epoch=0, total_steps=1, steps_per_epoch=1, lr=cfg.optim.lr, wd=cfg.optim.weight_decay)
    out = forward_backward(method, {"image": imgs, "keep": keep, "masked": masked}, info)
    fx.assert_close("out.loss", out["loss"].detach())

    with torch.no_grad():  # predictions at the masked tokens (the official decoder predicts every token)
        pred = method.decode(method.encoder(imgs, idx_keep=keep), keep, masked)
    expected = torch.gather(fx.tensors["out.pred"], 1, masked[..., None].expand(-1, -1, pred.size(-1)))
    fx.assert_close("out.pred", pred, expected)

    params = dict(method.named_parameters())
    names = [k[len("out.grad."):] for k in fx.tensors if k.startswith("out.grad.")]
    assert names and len(names) == sum(p.requires_grad for p in method.parameters()), \
        "every trainable parameter of ours must have an official gradient"
    for name in names:
        p = params[official_to_ours(name)]
        assert p.grad is not None, name
        fx.assert_close(f"out.grad.{name}", p.grad)

    # the weight-decay split is the official one
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    skipped = set(fx.config["optimizer"]["no_weight_decay"])
    for name in names:
        assert (id(params[official_to_ours(name)]) not in decayed) == (name in skipped), name

    apply_update(method, opt, info)
    for name in names:
        fx.assert_close(f"out.param.{name}", params[official_to_ours(name)].detach())
    for name in FIXED:  # frozen tables stay
        ours = params[official_to_ours(name)].detach()
        ref = fx.tensors[f"state.{name}"][:, 1:] if name == "decoder_pos_embed" else fx.tensors[f"state.{name}"]
        assert torch.equal(ours, ref), name
