"""One whole DINOv2 training step against the official ``SSLMetaArch.forward_backward`` + optimizer step +
``update_teacher`` (fixtures of kind ``dinov2_step``, written by ``tests/fixtures/generate/dinov2_step.py``).

For every fixture: our method is built from the official config in the sidecar, loaded with the official
weights (keys are the same: ``student.*``, ``teacher.*``; the centres are mapped), the official AdamW state and
the pending centre updates; then ``forward_backward`` + ``apply_update`` run on the official crops and masks.
Every loss term, the total, every student gradient (before clipping), the per-module gradient norms, the
schedule values the method computes itself (teacher temperature, EMA momentum), and the student, teacher and
centres after the step are compared at the sidecar tolerance.
"""
from __future__ import annotations

import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.config import build_config
from visrep.engine.step import apply_update, forward_backward
from visrep.methods.base import DataInfo, Step
from visrep.methods.dinov2 import DINOv2
from visrep.optim import apply_schedules, build_optimizer
from visrep.optim.schedules import cosine_momentum

# Official DINOLoss / iBOTPatchLoss constructor defaults (SSLMetaArch passes only out_dim)
OFFICIAL_STUDENT_TEMP, OFFICIAL_CENTER_MOMENTUM, OFFICIAL_SINKHORN_ITERS = 0.1, 0.9, 3


def our_config(fx):
    """The visrep config equivalent to the fixture's official OmegaConf config."""
    c, arch = fx.config["official_cfg"], fx.config["arch"]
    dino, ibot, crops, st, te, op, tr = (c[k] for k in ("dino", "ibot", "crops", "student", "teacher", "optim",
                                                        "train"))
    assert st["drop_path_rate"] == 0 and st["block_chunks"] == 0 and st["ffn_layer"] == "mlp"
    assert st["qkv_bias"] and st["proj_bias"] and st["ffn_bias"]
    method = dict(
        name="dinov2", n_local_crops=crops["local_crops_number"], local_crop_size=crops["local_crops_size"],
        head_n_prototypes=dino["head_n_prototypes"], head_bottleneck_dim=dino["head_bottleneck_dim"],
        head_hidden_dim=dino["head_hidden_dim"], head_nlayers=dino["head_nlayers"],
        ibot_separate_head=ibot["separate_head"], ibot_n_prototypes=ibot["head_n_prototypes"],
        ibot_bottleneck_dim=ibot["head_bottleneck_dim"], ibot_hidden_dim=ibot["head_hidden_dim"],
        ibot_nlayers=ibot["head_nlayers"],
        dino_loss_weight=dino["loss_weight"], ibot_loss_weight=ibot["loss_weight"],
        koleo_loss_weight=dino["koleo_loss_weight"], koleo_scope="local",
        mask_ratio=list(ibot["mask_ratio_min_max"]), mask_probability=ibot["mask_sample_probability"],
        centering=tr["centering"], center_momentum=OFFICIAL_CENTER_MOMENTUM, sinkhorn_iters=OFFICIAL_SINKHORN_ITERS,
        student_temp=OFFICIAL_STUDENT_TEMP, teacher_temp=te["teacher_temp"],
        warmup_teacher_temp=te["warmup_teacher_temp"], warmup_teacher_temp_epochs=te["warmup_teacher_temp_epochs"],
        momentum_teacher=[te["momentum_teacher"], te["final_momentum_teacher"]],
        epoch_length=tr["OFFICIAL_EPOCH_LENGTH"], freeze_last_layer_epochs=op["freeze_last_layer_epochs"],
        layerwise_decay=op["layerwise_decay"], patch_embed_lr_mult=op["patch_embed_lr_mult"],
        clip_grad=op["clip_grad"], drop_path_uniform=st["drop_path_uniform"])
    model = dict(patch_size=st["patch_size"], embed_dim=arch["embed_dim"], depth=arch["depth"],
                 num_heads=arch["num_heads"], mlp_ratio=arch["mlp_ratio"], qkv_bias=True, pos_embed="learned",
                 class_token=True, num_registers=st["num_register_tokens"], init_values=st["layerscale"],
                 drop_path_rate=0.0)
    optim = dict(name="adamw", lr=op["lr"], betas=[op["adamw_beta1"], op["adamw_beta2"]], eps=1e-8,
                 weight_decay=op["weight_decay"], final_weight_decay=op["weight_decay_end"], clip_grad=None)
    return build_config({"method": method, "model": model, "optim": optim,
                         "data": {"name": "procedural", "image_size": crops["global_crops_size"]}})


def build_method(fx) -> DINOv2:
    cfg = our_config(fx)
    c = fx.config["official_cfg"]
    assert c["student"]["interpolate_offset"] == 0.1 and not c["student"]["interpolate_antialias"]
    in_chans = fx.tensors["in.collated_global_crops"].shape[1]
    info = DataInfo(in_chans=in_chans, image_size=cfg.data.image_size, mean=(0.5,) * in_chans,
                    std=(0.5,) * in_chans)
    method = DINOv2(cfg, info).double()
    state = {k: v for k, v in fx.prefixed("state.").items() if k.startswith(("student.", "teacher."))}
    T = fx.tensors
    if "state.dino_loss.center" in T:
        state["dino_center.center"] = T["state.dino_loss.center"].reshape(1, -1)
    if "state.ibot_patch_loss.center" in T:
        state["ibot_center.center"] = T["state.ibot_patch_loss.center"].reshape(1, -1)
    missing, unexpected = method.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith(("dino_center.", "ibot_center.")) for k in missing), missing
    # pending centre updates recorded by the previous iteration (official reduce_center_update)
    for ours, theirs, length in ((method.dino_center, "dino_loss", "len_teacher_output"),
                                 (method.ibot_center, "ibot_patch_loss", "len_teacher_patch_tokens")):
        key = f"in.{theirs}.async_batch_center"
        if key in T:
            ours.pending.copy_((T[key] / T[f"in.{theirs}.{length}"]).reshape(1, -1))
            ours.has_pending.fill_(True)
    return method


def batch_of(fx, method: DINOv2) -> dict:
    """The official crop-major collate as our sample-major batch."""
    T, m = fx.tensors, method.cfg
    g, loc, masks = T["in.collated_global_crops"], T["in.collated_local_crops"], T["in.collated_masks"]
    B = g.shape[0] // 2
    batch = {"global_crops": g.view(2, B, *g.shape[1:]).transpose(0, 1),
             "masks": masks.view(2, B, -1).transpose(0, 1)}
    if m.n_local_crops:
        batch["local_crops"] = loc.view(m.n_local_crops, B, *loc.shape[1:]).transpose(0, 1)
    return batch


def optimizer_of(fx, method: DINOv2):
    cfg = our_config(fx)
    opt = build_optimizer(method.param_groups(), cfg.optim)
    names = {id(p): f"student.{n}" for n, p in method.student.named_parameters()}
    step = float(fx.config["run"]["adam_step"])
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            opt.state[p] = {"step": torch.tensor(step), "exp_avg": fx.tensors[f"in.optim.exp_avg.{n}"].to(p.dtype),
                            "exp_avg_sq": fx.tensors[f"in.optim.exp_avg_sq.{n}"].to(p.dtype)}
    return opt


def run_step(fx):
    torch.manual_seed(0)
    method = build_method(fx)
    method.train()
    opt = optimizer_of(fx, method)
    T, c = fx.tensors, fx.config["official_cfg"]
    it = fx.config["run"]["iteration"]
    ep = c["train"]["OFFICIAL_EPOCH_LENGTH"]
    info = Step(step=it, epoch=it // ep, total_steps=c["optim"]["epochs"] * ep, steps_per_epoch=ep,
                lr=float(T["in.schedule.lr"]), wd=float(T["in.schedule.wd"]))
    out = forward_backward(method, batch_of(fx, method), info)
    grads = {f"student.{n}": p.grad.detach().clone() for n, p in method.student.named_parameters()}
    norms = {k: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in v.parameters()]))
             for k, v in method.student.items()}
    apply_schedules(opt, info.lr, info.wd, info.step)
    apply_update(method, opt, info)
    return method, info, out, grads, norms


@pytest.fixture(scope="module", params=fixtures_of_kind("dinov2_step"))
def stepped(request):
    fx = load_fixture(request.param)
    return fx, *run_step(fx)


def test_schedules_the_method_computes(stepped):
    fx, method, info, *_ = stepped
    T, te = fx.tensors, fx.config["official_cfg"]["teacher"]
    fx.assert_close("in.schedule.teacher_temp", torch.tensor(method.teacher_temp(info.step), dtype=torch.float64))
    mom = cosine_momentum(info.step, info.total_steps, te["momentum_teacher"], te["final_momentum_teacher"])
    fx.assert_close("in.schedule.momentum", torch.tensor(mom, dtype=torch.float64))
    # last layers: lr 0 while frozen (our freeze_until), the official last_layer_lr (= lr) otherwise
    freeze_until = {g["freeze_until"] for g in method.param_groups() if g["freeze_until"]}
    if float(T["in.schedule.lr"]) != 0.0:
        frozen = float(T["in.schedule.last_layer_lr"]) == 0.0
        assert frozen == any(info.step < f for f in freeze_until)
    else:
        assert float(T["in.schedule.last_layer_lr"]) == 0.0


def test_loss_terms(stepped):
    fx, method, info, out, *_ = stepped
    T = fx.tensors
    # official loss_dict shows koleo_loss and ibot_loss halved ("to display the same losses as before")
    scale = {"koleo_loss": 2.0, "ibot_loss": 2.0}
    official = {k.removeprefix("out.loss_dict."): v for k, v in T.items() if k.startswith("out.loss_dict.")}
    ours = {k: v for k, v in out.items() if k != "loss"}
    assert set(ours) == set(official), (sorted(ours), sorted(official))
    for k in official:
        fx.assert_close(f"out.loss_dict.{k}", ours[k].double() / scale.get(k, 1.0))
    fx.assert_close("out.loss_total", out["loss"].detach())


def test_gradients(stepped):
    fx, _, _, _, grads, norms = stepped
    want = fx.prefixed("out.grad.")
    assert set(grads) == set(want), sorted(set(grads) ^ set(want))
    for n, g in grads.items():
        fx.assert_close(f"out.grad.{n}", g)
    for k, v in norms.items():
        fx.assert_close(f"out.grad_norm.{k}", v)


def test_state_after_step(stepped):
    fx, method, *_ = stepped
    ours = method.state_dict()
    want = fx.prefixed("out.state.")
    for k in want:
        if k.startswith(("student.", "teacher.")):
            fx.assert_close(f"out.state.{k}", ours[k])
    assert {k for k in want if k.startswith(("student.", "teacher."))} == \
        {k for k in ours if k.startswith(("student.", "teacher."))}
    T = fx.tensors
    for center, theirs in ((method.dino_center, "dino_loss"), (method.ibot_center, "ibot_patch_loss")):
        key = f"out.state.{theirs}.center"
        if key in T:
            fx.assert_close(key, center.center.reshape(T[key].shape))
            # the update recorded by this step is applied at the next step (lazy, as the official all-reduce)
            assert bool(center.has_pending)
            pend = f"out.{theirs}.pending_center"
            fx.assert_close(pend, center.pending.reshape(T[pend].shape))
