"""Whole-step parity with the official DiT (facebookresearch/DiT ``train.py`` + ``GaussianDiffusion.training_losses``).

For every ``dit_step`` fixture: our diffusion method built from the sidecar config, loaded with the official
model and EMA weights (same key names), given the official x_start, timesteps, noise and label-dropout draw,
runs ``training_step`` + backward + one AdamW step and the EMA update through the engine's
``forward_backward`` / ``apply_update``; the per-sample mse / vb / loss terms, the batch loss, every
parameter's gradient, every parameter after the step and the EMA after its update must match.
"""
from __future__ import annotations

import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture


def build(fx):
    from visrep.config import build_config
    from visrep.methods import build_method
    from visrep.methods.base import DataInfo

    m, d, o, e = fx.config["model"], fx.config["diffusion"], fx.config["optimizer"], fx.config["ema"]
    # supported: the MSE loss types (with or without the learned-sigma VLB term), epsilon prediction, all steps
    assert not d["use_kl"] and not d["predict_xstart"] and d["timestep_respacing"] == ""
    assert e["warmup"] is None
    linear = {"beta_start": d["linear_beta_start"], "beta_end": d["linear_beta_end"]}  # official: scaled by 1000/T
    cfg = build_config({
        "method": {"name": "diffusion", "num_train_timesteps": d["diffusion_steps"],
                   "beta_schedule": d["noise_schedule"], **(linear if d["noise_schedule"] == "linear" else {}),
                   "learn_sigma": m["learn_sigma"],
                   "rescale_learned_sigmas": d["rescale_learned_sigmas"], "class_cond": True,
                   "class_dropout": m["class_dropout_prob"], "hflip": False, "ema": e["decay"], "ema_warmup": False,
                   "sample_steps": 1},
        "data": {"image_size": m["input_size"]},
        "model": {"patch_size": m["patch_size"], "embed_dim": m["hidden_size"], "depth": m["depth"],
                  "num_heads": m["num_heads"], "mlp_ratio": m["mlp_ratio"], "pos_embed": "sincos"},
        "optim": {"name": "adamw", "lr": o["lr"], "start_lr": o["lr"], "final_lr": o["lr"],
                  "weight_decay": o["weight_decay"], "final_weight_decay": o["weight_decay"],
                  "betas": list(o["betas"]), "eps": o["eps"]},
    })
    info = DataInfo(in_chans=m["in_channels"], image_size=m["input_size"], num_classes=m["num_classes"])
    method = build_method(cfg, info).double()
    model = fx.prefixed("state.model.")
    ema = fx.prefixed("state.ema.") or model  # absent: the EMA starts as a copy of the model (train.py)
    for net, state in ((method.dit, model), (method.ema, ema)):
        net.load_state_dict(with_null_row(net, state), strict=True)
    return cfg, method


TABLE = "y_embedder.embedding_table.weight"


def with_null_row(net, state: dict) -> dict:
    """Official DiT without label dropout has no null-class row; ours always has one (unused then)."""
    state = dict(state)
    ours = net.state_dict()[TABLE]
    if state[TABLE].shape[0] == ours.shape[0] - 1:
        state[TABLE] = torch.cat([state[TABLE], ours[-1:].to(state[TABLE])])
    return state


def official_shape(key: str, ours: torch.Tensor, fx) -> torch.Tensor:
    """``ours`` cut to the official tensor's shape (the null-class row above)."""
    return ours[:fx.tensors[key].shape[0]] if key.endswith(TABLE) else ours


def use_official_frequencies(fx, monkeypatch) -> None:
    """The official timestep frequencies are float32 exp / cos / sin, whose last bit differs from CPU to CPU
    (fixtures made on one machine moved out.mse by 1.8e-8 relative on another, over the float64 tolerance).
    Where the fixture holds them (``in.t_freq``), ours must equal them at float32 precision and the step
    then runs on exactly them; older fixtures without them are compared as they are."""
    import visrep.models.dit as dit

    t = fx.tensors
    if "in.t_freq" not in t:
        return
    official = t["in.t_freq"]
    ours = dit.timestep_sinusoid(t["in.t"], official.shape[1])
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)  # one float32 ulp, no more
    steps = t["in.t"]

    def recorded(ts, dim, max_period=10000.0):
        assert torch.equal(ts.cpu(), steps) and dim == official.shape[1], "the fixture's timesteps only"
        return official.to(ts.device)

    monkeypatch.setattr(dit, "timestep_sinusoid", recorded)


@pytest.mark.parametrize("path", fixtures_of_kind("dit_step"))
def test_dit_step_matches_official(path, monkeypatch):
    from visrep.engine.step import apply_update, forward_backward
    from visrep.methods.base import Step
    from visrep.optim.factory import apply_schedules, build_optimizer

    fx = load_fixture(path)
    cfg, method = build(fx)
    method.train()
    t = fx.tensors
    use_official_frequencies(fx, monkeypatch)
    labels = method.drop_labels(t["in.y"], t["in.rng.label_drop_uniform"])
    assert torch.equal(labels, t["out.y_used"])
    batch = {"x0": t["in.x_start"], "noise": t["in.noise"], "timesteps": t["in.t"], "labels": labels}

    with torch.no_grad():
        terms = method.loss_terms(batch)
    assert ("vb" in terms) == ("out.vb" in t)
    for name, key in (("mse", "out.mse"), ("vb", "out.vb"), ("loss", "out.loss_per_sample")):
        if key in t:
            fx.assert_close(key, terms[name])

    opt = build_optimizer(method.param_groups(), cfg.optim)
    apply_schedules(opt, cfg.optim.lr, cfg.optim.weight_decay)
    info = Step(step=0, epoch=0, total_steps=1, steps_per_epoch=1, lr=cfg.optim.lr, wd=cfg.optim.weight_decay)
    out = forward_backward(method, batch, info)
    fx.assert_close("out.loss", out["loss"].detach())
    for name in ("mse", "vb"):
        if f"out.{name}" in t:
            fx.assert_close(f"out.{name}", out[name], t[f"out.{name}"].mean())

    params = dict(method.dit.named_parameters())
    names = [k[len("out.grad."):] for k in t if k.startswith("out.grad.")]
    assert names and len(names) == sum(p.requires_grad for p in method.parameters()), \
        "every trainable parameter of ours must have an official gradient"
    for name in names:
        assert params[name].grad is not None, name
        fx.assert_close(f"out.grad.{name}", official_shape(f"out.grad.{name}", params[name].grad, fx))

    apply_update(method, opt, info)
    for name in names:
        fx.assert_close(f"out.param.{name}", official_shape(f"out.param.{name}", params[name].detach(), fx))
    ema = dict(method.ema.named_parameters())
    ema_keys = [k for k in t if k.startswith("out.ema.")]
    assert len(ema_keys) == len(ema)
    for key in ema_keys:
        fx.assert_close(key, official_shape(key, ema[key[len("out.ema."):]].detach(), fx))
