"""One whole PAWS training step matches the official facebookresearch/suncet step (every ``paws_step`` fixture):
our ``training_step`` + ``forward_backward`` + ``apply_update`` with LARS(SGD) against ``src/paws_train.py``'s
``train_step`` on the same weights, support / unlabelled views and labels.

Compared: the loss terms (ploss, me-max) and the total, the embeddings before / after the prediction head, the
gradient of every parameter (backbone, projection head, prediction head), and the state after the LARS step
(weights and BN statistics). Fixtures: ``tests/fixtures/generate/paws_step.py``.
"""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture


def official_to_ours(key: str) -> str:
    """Official PAWS encoder key (``fc.*`` projection head, ``pred.*`` prediction head) -> our PAWS key."""
    if key.startswith("fc."):
        return "head." + key[3:]
    if key.startswith("pred."):
        return key
    return "encoder." + key


def build(fx):
    from visrep.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from visrep.methods.base import DataInfo
    from visrep.methods.paws import PAWS, PAWSConfig
    from visrep.optim.factory import resolve_optim_defaults

    c = fx.config
    a = c["args"]
    meta, crit, data, opt = a["meta"], a["criterion"], a["data"], a["optimization"]
    assert not opt["nesterov"], "our LARS has no nesterov (PAWS: off)"
    mcfg = PAWSConfig(backbone="wrn", wrn_depth=c["wrn"]["depth"], wrn_widen=c["wrn"]["widen_factor"],
                      hidden_dim=c["hidden_dim"], output_dim=meta["output_dim"], use_pred_head=meta["use_pred_head"],
                      temperature=crit["temperature"], sharpen=crit["sharpen"], me_max=crit["me_max"],
                      label_smoothing=data["label_smoothing"], classes_per_batch=crit["classes_per_batch"],
                      supports_per_class=crit["supervised_imgs_per_class"],
                      supervised_views=crit["supervised_views"], labels_per_class=crit["supervised_imgs_per_class"],
                      label_fraction=None, multicrop=data["multicrop"], mc_size=data["mc_size"])
    optim = resolve_optim_defaults(OptimConfig(
        name="lars", lr=opt["lr"], start_lr=opt["start_lr"], final_lr=opt["final_lr"], warmup_epochs=opt["warmup"],
        weight_decay=opt["weight_decay"], final_weight_decay=opt["weight_decay"], momentum=opt["momentum"],
        lars_eta=0.001))
    cfg = Config(method=mcfg, data=DataConfig(image_size=c["img_size"]), model=ModelConfig(), optim=optim,
                 train=TrainConfig(epochs=opt["epochs"]))
    PAWS.validate(cfg)
    info = DataInfo(in_chans=3, image_size=c["img_size"], num_classes=crit["classes_per_batch"])
    method = PAWS(cfg, info).double().train()
    state = {official_to_ours(k): v for k, v in fx.prefixed("state.").items()}
    missing, unexpected = method.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("normalize.") for k in missing), missing
    return method, cfg


@pytest.mark.parametrize("path", fixtures_of_kind("paws_step"))
def test_paws_step(path):
    from visrep.engine.step import apply_update, forward_backward
    from visrep.losses import smoothed_one_hot
    from visrep.methods.base import Step
    from visrep.optim.factory import apply_schedules, build_optimizer
    from visrep.optim.schedules import build_schedules

    fx = load_fixture(path)
    c = fx.config
    crit = c["args"]["criterion"]
    method, cfg = build(fx)
    C, sb = crit["classes_per_batch"], crit["supervised_imgs_per_class"]
    labels = torch.arange(C).repeat(sb)                 # ClassStratifiedSampler order: row r has class r % C
    fx.assert_close("in.labels_matrix",
                    smoothed_one_hot(labels, C, c["args"]["data"]["label_smoothing"], dtype=torch.float64))
    simgs, uimgs = fx.listed("in.simgs"), fx.listed("in.uimgs")
    batch = {"supports": {"views": torch.stack(simgs, 1), "label": labels}, "large": torch.stack(uimgs[:2], 1)}
    if len(uimgs) > 2:
        batch["small"] = torch.stack(uimgs[2:], 1)

    # suncet's WarmupCosineSchedule is a LambdaLR stepped after the optimizer: step s runs at lambda(s), which is
    # PAWS's schedule_offset = 0 (the engine builds the schedules with it)
    ipe, epochs, s = c["ipe"], c["args"]["optimization"]["epochs"], c["start_step"]
    lr_s, _ = build_schedules(cfg.optim, ipe, ipe * epochs, offset=method.schedule_offset)
    fx.assert_close("out.lr", torch.tensor(lr_s(s), dtype=torch.float64))
    lr = lr_s(s)  # our schedule, checked against the official one above
    info = Step(step=s, epoch=s // ipe, total_steps=ipe * epochs, steps_per_epoch=ipe, lr=lr,
                wd=cfg.optim.weight_decay)
    optimizer = build_optimizer(method.param_groups(), cfg.optim)
    apply_schedules(optimizer, info.lr, info.wd, info.step)

    views = list(batch["supports"]["views"].transpose(0, 1))
    views = views + list(batch["large"].transpose(0, 1)) + (list(batch["small"].transpose(0, 1))
                                                                  if "small" in batch else [])
    with torch.no_grad():   # the embeddings (train-mode BN: a copy of the BN buffers is restored below)
        buffers = {k: v.clone() for k, v in method.named_buffers()}
        h, z = method.embed(views)
        for k, v in method.named_buffers():
            v.copy_(buffers[k])
    fx.assert_close("out.h", h)
    fx.assert_close("out.z", z)

    out = forward_backward(method, batch, info)
    fx.assert_close("out.loss", out["loss"].detach())
    fx.assert_close("out.ploss", out["ce"].detach())
    fx.assert_close("out.me_max", out["me_max"].detach() if crit["me_max"] else torch.zeros((), dtype=torch.float64))

    params = dict(method.named_parameters())
    grads = fx.prefixed("out.grad.")
    mapped = {official_to_ours(k): k for k in grads}
    trainable = {k for k, p in params.items() if p.requires_grad}
    assert set(mapped) == trainable, set(mapped) ^ trainable
    for ours, theirs in mapped.items():
        fx.assert_close(f"out.grad.{theirs}", params[ours].grad)

    apply_update(method, optimizer, info)
    after = method.state_dict()
    for theirs, value in fx.prefixed("out.state_after.").items():
        ours = official_to_ours(theirs)
        assert ours in after, f"{theirs} -> {ours} missing"
        fx.assert_close(f"out.state_after.{theirs}", after[ours].to(value.dtype))
