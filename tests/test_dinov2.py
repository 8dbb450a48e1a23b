"""DINOv2 method: variants the contract recipe does not cover (Sinkhorn, separate iBOT head, no local
crops) on 2 processes, parameter groups, schedules, the loss normalisation and distillation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_contract import _one_step, _prepared, _worker, build, state, tiny_config
from torch import Tensor

from visrep.config import ConfigError
from visrep.methods import Step

VARIANTS = {
    "sinkhorn_separate_head": ["method.centering=sinkhorn_knopp", "method.ibot_separate_head=true",
                               "method.ibot_n_prototypes=48", "method.ibot_hidden_dim=32",
                               "method.ibot_bottleneck_dim=16"],
    "no_local_koleo_local": ["method.n_local_crops=0", "method.koleo_scope=local", "method.koleo_loss_weight=0"],
}


@pytest.mark.ddp
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_two_processes_equal_one(variant, tmp_path, free_port):
    cfg, method, ds, batch = _prepared("dinov2", tmp_path, VARIANTS[variant])
    loss, params = _one_step(cfg, method, ds, batch)
    mp.start_processes(_worker, args=(2, free_port, "dinov2", str(tmp_path), tuple(VARIANTS[variant])), nprocs=2,
                       join=True, start_method="fork")
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["loss"] == pytest.approx(loss, rel=1e-10, abs=1e-12)
        for k, v in params.items():
            torch.testing.assert_close(out["params"][k], v, rtol=1e-9, atol=1e-11, msg=k)


def _step(method, batch, step=0):
    return method.training_step(batch, Step(step=step, epoch=0, total_steps=10, steps_per_epoch=5))


def _expected_dino_terms(method, batch, n_local: int) -> tuple[Tensor, Tensor | None]:
    """The official DINO terms recomputed from the modules: each student global crop against the teacher's
    OTHER crop, every local crop against both teacher crops, the teacher's centre still zero (lazy update),
    each cross-entropy a batch mean, normalised by the number of (student, teacher) crop pairs
    ``(n_global - 1) * n_global + max(n_local * n_global, 1)`` (= 3 without local crops, 2 + 2 n_local with)."""
    m, s, t = method.cfg, method.student, method.teacher
    glob = batch["global_crops"].transpose(0, 1).flatten(0, 1)
    masks = batch["masks"].transpose(0, 1).flatten(0, 1)
    crop_a, crop_b = t["dino_head"](t["backbone"].forward_features(glob)["x_norm_clstoken"]).chunk(2)
    targets = [F.softmax(x / method.teacher_temp(0), dim=-1) for x in (crop_b, crop_a)]  # swapped
    student = s["dino_head"](s["backbone"].forward_features(glob, mask=masks)["x_norm_clstoken"]).chunk(2)

    def ce(logits, p):
        return -(p * F.log_softmax(logits / m.student_temp, dim=-1)).sum(-1).mean()

    pairs = (2 - 1) * 2 + max(n_local * 2, 1)
    glob_term = sum(ce(x, p) for x, p in zip(student, targets)) / pairs
    if not n_local:
        return glob_term, None
    loc = batch["local_crops"].transpose(0, 1).flatten(0, 1)
    local = s["dino_head"](s["backbone"].forward_features(loc)["x_norm_clstoken"]).chunk(n_local)
    return glob_term, sum(ce(x, p) for x in local for p in targets) / pairs


@pytest.mark.parametrize("n_local", [0, 2])
def test_loss_normalisation_and_lazy_center(tmp_path, n_local):
    cfg = tiny_config("dinov2", tmp_path, f"method.n_local_crops={n_local}", "model.drop_path_rate=0")
    method, ds = build(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every weight matters (at init LayerScale makes every [CLS] output nearly the same)
        for p in [*method.student.parameters(), *method.teacher.parameters()]:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    images = ds.tensors()[0][:6]
    batch = method.prepare_batch({"image": images, "label": torch.zeros(6, dtype=torch.long)},
                                 torch.Generator().manual_seed(0))
    assert batch["global_crops"].shape[:2] == (6, 2) and ("local_crops" in batch) == bool(n_local)
    masks = batch["masks"].flatten(0, 1)
    assert int((masks.sum(-1) > 0).sum()) == 6  # half of the 12 global crops are masked
    with torch.no_grad():
        glob_term, local_term = _expected_dino_terms(method, batch, n_local)
    out = _step(method, batch)
    torch.testing.assert_close(out["dino_global_crops_loss"], glob_term, rtol=1e-5, atol=1e-6)
    if n_local:
        torch.testing.assert_close(out["dino_local_crops_loss"], local_term, rtol=1e-5, atol=1e-6)
    else:
        assert "dino_local_crops_loss" not in out
    m = cfg.method
    total = m.dino_loss_weight * (glob_term + (local_term if n_local else 0)) + out["koleo_loss"] \
        + m.ibot_loss_weight * out["ibot_loss"]
    torch.testing.assert_close(out["loss"].detach(), total, rtol=1e-5, atol=1e-6)
    # the centre is updated lazily: still zero after the first step, folded in at the next call
    assert method.dino_center.has_pending and torch.count_nonzero(method.dino_center.center) == 0
    _step(method, batch, 1)
    assert torch.count_nonzero(method.dino_center.center) > 0


def test_param_groups_and_schedules(tmp_path):
    cfg = tiny_config("dinov2", tmp_path, "method.layerwise_decay=0.5", "method.epoch_length=7",
                      "method.freeze_last_layer_epochs=2")
    method, _ = build(cfg)
    groups = method.param_groups()
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(method.student.named_parameters())
    depth = cfg.model.depth
    g = by_param[id(named["dino_head.last_layer.weight_g"])]
    assert g["freeze_until"] == 14 and not g.get("wd_exclude")       # weight_g is decayed (official)
    assert by_param[id(named["backbone.pos_embed"])]["lr_scale"] == pytest.approx(0.5 ** (depth + 1))
    patch = by_param[id(named["backbone.patch_embed.proj.weight"])]
    assert patch["lr_scale"] == pytest.approx(0.2 * 0.5 ** (depth + 1))
    assert by_param[id(named["backbone.blocks.0.attn.qkv.weight"])]["lr_scale"] == pytest.approx(0.5 ** depth)
    assert by_param[id(named["backbone.norm.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["backbone.blocks.1.ls1.gamma"])]["wd_exclude"]
    assert not by_param[id(named["backbone.cls_token"])].get("wd_exclude")
    assert by_param[id(named["dino_head.mlp.0.weight"])]["freeze_until"] == 0
    m = cfg.method
    assert method.teacher_temp(0) == pytest.approx(m.warmup_teacher_temp)
    warm = int(m.warmup_teacher_temp_epochs * m.epoch_length)
    assert method.teacher_temp(warm) == pytest.approx(m.teacher_temp)
    assert method.teacher_temp(warm - 1) == pytest.approx(m.teacher_temp)  # np.linspace includes the end


def test_sqrt_lr_scaling(tmp_path):
    from visrep.engine.trainer import Trainer

    cfg = tiny_config("dinov2", tmp_path, "optim.lr_batch_ref=2", "optim.lr_batch_scaling=sqrt", "optim.lr=0.01")
    method, ds = build(cfg)
    trainer = Trainer(cfg, method, ds)
    assert trainer.lr_schedule.ref_lr == pytest.approx(0.01 * math.sqrt(cfg.train.batch_size / 2))


def test_validate():
    with pytest.raises(ConfigError, match="class_token"):
        tiny_config("dinov2", "/tmp/x", "model.class_token=false")
    with pytest.raises(ConfigError, match="local_crop_size"):
        tiny_config("dinov2", "/tmp/x", "method.local_crop_size=6")
    with pytest.raises(ConfigError, match="teacher_checkpoint"):
        tiny_config("dinov2", "/tmp/x", "method.teacher_checkpoint=/nonexistent.pt")


def test_distillation_from_frozen_teacher(tmp_path):
    from visrep.engine import train

    tcfg = tiny_config("dinov2", tmp_path / "teacher", "train.max_steps=2", "model.embed_dim=48", "model.num_heads=3")
    teacher_method, ds = build(tcfg)
    ckpt = train(tcfg, teacher_method, ds).checkpoint
    cfg = tiny_config("dinov2", tmp_path / "student", "train.max_steps=2", f"method.teacher_checkpoint={ckpt}",
                      "method.mask_probability=0", "method.ibot_loss_weight=0")
    student, ds = build(cfg)
    want = {k: v.clone() for k, v in teacher_method.teacher.state_dict().items()}
    assert all(torch.equal(v, student.teacher.state_dict()[k]) for k, v in want.items())
    assert not any(p.requires_grad for p in student.teacher.parameters())
    ema0 = {k: v.clone() for k, v in student.student_ema.state_dict().items()}
    result = train(cfg, student, ds)
    assert all(math.isfinite(x) for x in result.losses)
    assert all(torch.equal(v, student.teacher.state_dict()[k]) for k, v in want.items())  # frozen
    assert any(not torch.equal(v, student.student_ema.state_dict()[k]) for k, v in ema0.items())
    assert student.eval_module() is student.student_ema["backbone"]
    assert student.features(ds.tensors()[0][:3]).shape == (3, cfg.model.embed_dim)
    assert state(student).keys() >= {"teacher.backbone.pos_embed", "student_ema.backbone.pos_embed"}


def test_activation_checkpointing_gives_the_same_gradients(tmp_path):
    grads = {}
    for flag in (False, True):
        cfg = tiny_config("dinov2", tmp_path, f"model.grad_checkpointing={flag}", "model.drop_path_rate=0.2")
        method, ds = build(cfg)
        assert method.student["backbone"].grad_checkpointing is flag
        batch = method.prepare_batch({"image": ds.tensors()[0][:4], "label": torch.zeros(4, dtype=torch.long)},
                                     torch.Generator().manual_seed(0))
        torch.manual_seed(1)  # drop path draws from the global RNG
        _step(method, batch)["loss"].backward()
        grads[flag] = {k: p.grad.clone() for k, p in method.student.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-5, atol=1e-7, msg=k)


def test_batch_subset_drop_path_matches_the_official_rule():
    from timm.models.vision_transformer import Block

    from visrep.models.vit import SubsetDropPathBlock

    torch.manual_seed(0)
    plain = Block(16, 2, init_values=0.5)
    x = torch.randn(5, 3, 16)
    want_eval = plain(x)
    blk = SubsetDropPathBlock(16, 2, init_values=0.5, drop_path=0.4)
    blk.load_state_dict(plain.state_dict())  # same keys as timm's Block
    blk.eval()
    torch.testing.assert_close(blk(x), want_eval)
    blk.train()
    torch.manual_seed(7)
    got = blk(x)
    torch.manual_seed(7)  # by hand: 3 of 5 samples per branch, residuals scaled by 5 / 3
    i1 = torch.randperm(5)[:3]
    y = x.clone()
    y[i1] += 5 / 3 * blk.ls1(blk.attn(blk.norm1(x[i1])))
    i2 = torch.randperm(5)[:3]
    z = y.clone()
    z[i2] += 5 / 3 * blk.ls2(blk.mlp(blk.norm2(y[i2])))
    torch.testing.assert_close(got, z)


def test_global_crops_masked_without_ibot(tmp_path):
    """As the official collate + forward_backward: the student's global crops carry the iBOT masks even
    with ``ibot_loss_weight=0`` (the mask token then gets a gradient through the DINO and KoLeo terms)."""
    cfg = tiny_config("dinov2", tmp_path, "method.ibot_loss_weight=0")
    method, ds = build(cfg)
    images = ds.tensors()[0][:4]
    batch = method.prepare_batch({"image": images, "label": torch.zeros(4, dtype=torch.long)},
                                 torch.Generator().manual_seed(0))
    assert int((batch["masks"].flatten(0, 1).sum(-1) > 0).sum()) == 4  # half of the 8 global crops
    out = _step(method, batch)
    assert "ibot_loss" not in out
    out["loss"].backward()
    assert method.student["backbone"].mask_token.grad.abs().sum() > 0
