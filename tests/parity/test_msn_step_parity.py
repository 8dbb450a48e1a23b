"""One whole MSN training step matches the official facebookresearch/msn step (every ``msn_step`` fixture):
our ``training_step`` + ``forward_backward`` + ``apply_update`` (clipping, AdamW at the schedule position, EMA)
against ``src/msn_train.py``'s ``train_step`` on the same weights, views and patch-drop permutation.

Compared: every loss term (ploss, me-max, entropy), the total, the official logs and targets, the gradient of
every parameter (encoder, head, prototypes), the lr / weight decay / EMA momentum / sharpening of the step, and
the state after the step (online encoder + head incl. BN statistics, prototypes, target encoder + head after
the EMA incl. the target's own BN statistics). Fixtures: ``tests/fixtures/generate/msn_step.py``.
"""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture


def official_to_ours(key: str, prefix: str = "") -> str:
    """Official MSN key (the encoder's ``fc.*`` is the projection head) -> our MSN state-dict key."""
    if key == "prototypes":
        return "prototypes"
    net, rest = key.split(".", 1)                      # "encoder" / "target_encoder"
    if rest.startswith("fc."):
        return ("head." if net == "encoder" else "target_head.") + rest[3:]
    return f"{net}.{rest}"


def build(fx):
    from visrep.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from visrep.methods.base import DataInfo
    from visrep.methods.msn import MSN, MSNConfig
    from visrep.optim.factory import resolve_optim_defaults

    c = fx.config
    m, a = c["model"], c["args"]
    meta, crit, data, opt = a["meta"], a["criterion"], a["data"], a["optimization"]
    mcfg = MSNConfig(num_prototypes=crit["num_proto"], hidden_dim=meta["hidden_dim"], output_dim=meta["output_dim"],
                     use_bn=meta["use_bn"], temperature=crit["temperature"],
                     sharpen=(crit["start_sharpen"], crit["final_sharpen"]), ema=(0.996, 1.0),
                     me_max_weight=float(crit["memax_weight"]) if crit["me_max"] else 0.0,
                     entropy_weight=float(crit["ent_weight"]) if crit["use_ent"] else 0.0,
                     use_sinkhorn=crit["use_sinkhorn"], sinkhorn_iters=3, label_smoothing=data["label_smoothing"],
                     proto_grad_reduce="sum", clip_grad=opt["clip_grad"] if opt["clip_grad"] > 0 else None,
                     patch_drop=data["patch_drop"], rand_views=data["rand_views"], focal_views=data["focal_views"],
                     rand_size=data["rand_size"], focal_size=data["focal_size"])
    optim = resolve_optim_defaults(OptimConfig(
        name="adamw", lr=opt["lr"], start_lr=opt["start_lr"], final_lr=opt["final_lr"], warmup_epochs=opt["warmup"],
        weight_decay=opt["weight_decay"], final_weight_decay=opt["final_weight_decay"], ipe_scale=1.25))
    cfg = Config(method=mcfg, data=DataConfig(image_size=data["rand_size"]),
                 model=ModelConfig(patch_size=m["patch_size"], embed_dim=m["embed_dim"], depth=m["depth"],
                                   num_heads=m["num_heads"], mlp_ratio=float(m["mlp_ratio"]), qkv_bias=m["qkv_bias"],
                                   pos_embed="learned", class_token=True),
                 optim=optim, train=TrainConfig(epochs=opt["epochs"]))
    MSN.validate(cfg)
    method = MSN(cfg, DataInfo(in_chans=3, image_size=m["img_size"])).double().train()
    state = {official_to_ours(k): v for k, v in fx.prefixed("state.").items()}
    missing, unexpected = method.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k in ("proto_labels", "prior") or k.startswith("normalize.") for k in missing), missing
    return method, cfg


def batch_of(fx):
    imgs = fx.listed("in.imgs")
    data = fx.config["args"]["data"]
    R = data["rand_views"]
    kept = fx.tensors["in.rng.kept_idx"]
    assert kept[0] == 0
    B = imgs[0].shape[0]
    batch = {"target": imgs[0], "anchors": torch.stack(imgs[1:1 + R], 1), "idx_keep": (kept[1:] - 1).expand(B, -1)}
    if data["focal_views"]:
        batch["focal"] = torch.stack(imgs[1 + R:], 1)
    return batch


@pytest.mark.parametrize("path", fixtures_of_kind("msn_step"))
def test_msn_step(path):
    from visrep.engine.step import apply_update, forward_backward
    from visrep.methods.base import Step
    from visrep.methods.msn import num_kept
    from visrep.optim.factory import apply_schedules, build_optimizer
    from visrep.optim.schedules import build_schedules, schedule_horizon

    fx = load_fixture(path)
    c, t = fx.config, fx.tensors
    method, cfg = build(fx)
    fx.assert_close("in.proto_labels", method.proto_labels)
    data = c["args"]["data"]
    n = (data["rand_size"] // c["model"]["patch_size"]) ** 2
    assert method.keep == num_kept(n, data["patch_drop"]) == t["in.rng.kept_idx"].numel() - 1

    # schedules at the step's position
    ipe, epochs, s = c["ipe"], c["args"]["optimization"]["epochs"], c["start_step"]
    lr_s, wd_s = build_schedules(cfg.optim, ipe, ipe * epochs)
    info = Step(step=s, epoch=s // ipe, total_steps=schedule_horizon(ipe * epochs, cfg.optim.ipe_scale),
                steps_per_epoch=ipe, lr=lr_s(s), wd=wd_s(s))
    assert info.total_steps == c["T_max"]
    fx.assert_close("out.lr", torch.tensor(info.lr, dtype=torch.float64))
    fx.assert_close("out.wd", torch.tensor(info.wd, dtype=torch.float64))
    fx.assert_close("out.T", torch.tensor(method.sharpen_at(info), dtype=torch.float64))

    optimizer = build_optimizer(method.param_groups(), cfg.optim)
    apply_schedules(optimizer, info.lr, info.wd, info.step)
    out = forward_backward(method, batch_of(fx), info)

    # loss terms: the official value of a disabled term is the python float 0.0
    crit = c["args"]["criterion"]
    fx.assert_close("out.loss", out["loss"].detach())
    fx.assert_close("out.ploss", out["ce"].detach())
    fx.assert_close("out.me_max", out["me_max"].detach() if crit["me_max"] else torch.zeros((), dtype=torch.float64))
    fx.assert_close("out.ent", out["entropy"].detach() if crit["use_ent"] else torch.zeros((), dtype=torch.float64))
    for name in ("np", "max_t", "min_t"):
        fx.assert_close(f"out.log.{name}", out[name].detach().reshape(()))

    # gradients of every parameter (before clipping), official names
    params = dict(method.named_parameters())
    grads = fx.prefixed("out.grad.")
    trainable = {k for k, p in params.items() if p.requires_grad}
    mapped = {official_to_ours(k): k for k in grads}
    assert set(mapped) == trainable, (set(mapped) ^ trainable)
    for ours, theirs in mapped.items():
        fx.assert_close(f"out.grad.{theirs}", params[ours].grad)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(params[k].grad) for k in trainable
                                                 if k != "prototypes"]))
    fx.assert_close("out.grad_norm", norm)

    # one optimizer step (pre-step hook: prototype AllReduceSum + clipping; AdamW; post-step: EMA)
    m0, m1 = method.cfg.ema
    from visrep.optim.schedules import linear_momentum
    fx.assert_close("out.momentum", torch.tensor(min(m1, linear_momentum(s, info.total_steps, m0, m1)),
                                                 dtype=torch.float64))
    apply_update(method, optimizer, info)
    after = method.state_dict()
    expected = fx.prefixed("out.state_after.")
    for theirs, value in expected.items():
        ours = official_to_ours(theirs)
        assert ours in after, f"{theirs} -> {ours} missing"
        fx.assert_close(f"out.state_after.{theirs}", after[ours].to(value.dtype))
