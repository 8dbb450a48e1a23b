"""Engine tests with toy methods: resume exactness, NaN guard, atomic checkpoints, time budget,
schedules, optimizer groups, config errors. Everything is tiny (an MLP on 4x4 random images)."""
from __future__ import annotations

import errno
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visrep.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from visrep.config import Config, ConfigError, OptimConfig, TrainConfig, load_config
from visrep.engine.trainer import NonFiniteLossError, ResumeError, Trainer, train
from visrep.methods.base import DataInfo, Method, Step, decay_groups
from visrep.optim import (
    CosineWD,
    WarmupCosine,
    build_optimizer,
    build_schedules,
    cosine_momentum,
    ema_update_,
    linear_momentum,
    make_target,
)

# ------------------------------------------------------------------------------------------------
# toys


@dataclass
class ToyConfig:
    name: Literal["toy"] = "toy"
    hidden: int = 16
    dropout: float = 0.1


class ToyData(torch.utils.data.Dataset):
    """Random uint8 images [N, 1, 4, 4] with 4 classes; exposes ``tensors()`` (in-memory path)."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 4, (n,), generator=g)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def tensors(self):
        return self.images, self.labels


class NoTensors(torch.utils.data.Dataset):
    """The same data without ``tensors()`` (DataLoader path)."""

    def __init__(self, data: ToyData):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


class ToyMethod(Method):
    """MLP classifier with dropout (global RNG) and generator noise in prepare_batch."""

    def __init__(self, hidden: int = 16, dropout: float = 0.1, nan_at: int | None = None):
        super().__init__(None, DataInfo(in_chans=1, image_size=4, num_classes=4))
        torch.manual_seed(123)
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, 8))
        self.head = nn.Linear(8, 4)
        self.nan_at = nan_at
        self.freeze_head = 0

    @staticmethod
    def _float(x):
        return x.float() / 255 if x.dtype == torch.uint8 else x

    def prepare_batch(self, batch, generator):
        x = self._float(batch["image"])
        return {**batch, "image": x + 0.05 * torch.randn(x.shape, generator=generator).to(x.device)}

    def training_step(self, batch, step: Step):
        x, y = batch["image"], batch["label"]
        logits = self.head(self.encoder(self._float(x)))
        ce = F.cross_entropy(logits, y)
        reg = 1e-3 * logits.pow(2).mean()
        if self.nan_at is not None and step.step == self.nan_at:
            ce = ce * float("nan")
        return {"loss": ce + reg, "loss_ce": ce, "loss_reg": reg}

    def param_groups(self):
        groups = decay_groups(self.encoder)
        groups.append({"params": list(self.head.parameters()), "lr_scale": 0.5, "wd_scale": 0.5,
                       "freeze_until": self.freeze_head})
        return groups

    def features(self, images):
        return self.encoder(self._float(images))


class EMAToy(ToyMethod):
    def __init__(self):
        super().__init__(dropout=0.0)
        self.target = make_target(self.encoder)
        self.calls: list[int] = []

    def after_optimizer_step(self, step: Step):
        self.calls.append(step.step)
        ema_update_(self.target, self.encoder, linear_momentum(step.step, step.total_steps, 0.9, 1.0))


def make_cfg(tmp_path, name="run", **train_kw) -> Config:
    kw = dict(epochs=2, batch_size=8, out_dir=str(tmp_path / name), ckpt_every=4, log_every=2, seed=3,
              progress=False, device="cpu", threads=1)
    kw.update(train_kw)
    optim = OptimConfig(lr=1e-2, start_lr=1e-3, final_lr=1e-5, warmup_epochs=0.5, weight_decay=0.04,
                        final_weight_decay=0.1)
    return Config(method=ToyConfig(), optim=optim, train=TrainConfig(**kw))


def params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# (a) resume is exact


@pytest.mark.parametrize("in_memory", [True, False])
def test_resume_gives_identical_losses(tmp_path, in_memory):
    data = ToyData() if in_memory else NoTensors(ToyData())
    full_cfg = make_cfg(tmp_path, "full")
    full = train(full_cfg, ToyMethod(), data)
    assert full.stopped_by == "done" and full.step == 16 and len(full.losses) == 16

    cfg = make_cfg(tmp_path, "split", max_steps=5)  # 5: not a multiple of ckpt_every nor of an epoch
    first = train(cfg, ToyMethod(), data)
    assert first.stopped_by == "max_steps" and first.step == 5
    assert load_checkpoint(first.checkpoint)["step"] == 5

    cfg.train.max_steps = None
    method = ToyMethod()
    second = train(cfg, method, data, resume=True)
    assert second.start_step == 5 and second.stopped_by == "done"
    assert first.losses + second.losses == full.losses  # exact, step for step
    final_full = load_checkpoint(full.checkpoint)["model"]
    for k, v in params(method).items():
        assert torch.equal(v, final_full[k]), k


def test_resume_refuses_a_different_run(tmp_path):
    data = ToyData()
    cfg = make_cfg(tmp_path, max_steps=2)
    train(cfg, ToyMethod(), data)
    cfg.method.hidden = 32
    with pytest.raises(ResumeError, match=r"method\.hidden: 16 -> 32"):
        train(cfg, ToyMethod(hidden=32), data, resume=True)
    cfg.method.hidden = 16
    cfg.train.batch_size = 4
    with pytest.raises(ResumeError, match=r"train\.batch_size"):
        train(cfg, ToyMethod(), data, resume=True)
    cfg.train.batch_size = 8
    cfg.train.max_minutes = 5.0  # does not change the run
    assert train(cfg, ToyMethod(), data, resume=True).start_step == 2
    with pytest.raises(CheckpointError, match="not found"):
        train(make_cfg(tmp_path, "nothing"), ToyMethod(), data, resume=True)
    assert train(make_cfg(tmp_path, "fresh", max_steps=1), ToyMethod(), data, resume="auto").start_step == 0


def test_ema_hook_called_every_step(tmp_path):
    m = EMAToy()
    before = params(m.target)
    res = train(make_cfg(tmp_path, epochs=1), m, ToyData())
    assert m.calls == list(range(res.step))
    after = params(m.target)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for p in m.target.parameters())


# ------------------------------------------------------------------------------------------------
# (b) NaN guard


def test_nan_guard_names_step_and_term(tmp_path):
    cfg = make_cfg(tmp_path, ckpt_every=2)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, ToyMethod(nan_at=3), ToyData())
    msg = str(info.value)
    # the 4th step (index 3) is numbered 4, as metrics.jsonl numbers the record written after it
    assert "step 4 (epoch 0)" in msg and "loss_ce=nan" in msg and "loss=nan" in msg
    assert "loss_reg" not in msg  # finite terms are not blamed
    assert str(tmp_path / "run" / "last.pt") in msg and "(step 2" in msg
    assert info.value.step == 4
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["step"] == 2  # the last good checkpoint, not overwritten


# ------------------------------------------------------------------------------------------------
# (c) atomic checkpoints


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def full_disk(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device") as info:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert str(path) in str(info.value) and "previous checkpoint is intact" in str(info.value)
    monkeypatch.undo()
    assert os.listdir(path.parent) == ["last.pt"]  # no temp file left
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(bad)


def test_trainer_checkpoint_failure_is_reported(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, ckpt_every=2)
    real_save = torch.save
    calls = []

    def save_then_fail(obj, f, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(CheckpointError, match="no space left on device while writing"):
        train(cfg, ToyMethod(), ToyData())
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "run" / "last.pt")["step"] == 2
    assert sorted(os.listdir(tmp_path / "run")) == ["config.yaml", "last.pt", "metrics.jsonl", "tb"]


# ------------------------------------------------------------------------------------------------
# (d) time budget


class SlowToy(ToyMethod):
    def training_step(self, batch, step):
        time.sleep(0.01)
        return super().training_step(batch, step)


def test_time_budget_stops_cleanly(tmp_path):
    cfg = make_cfg(tmp_path, epochs=1000, max_minutes=0.3 / 60)
    res = train(cfg, SlowToy(), ToyData())
    assert res.stopped_by == "max_minutes"
    assert 1 <= res.step < 8000 and res.total_steps == 8000  # horizon unchanged
    ck = load_checkpoint(res.checkpoint)
    assert ck["step"] == res.step and ck["total_steps"] == 8000


def test_calibrate_total_steps_fits_the_budget(tmp_path):
    cfg = make_cfg(tmp_path, epochs=1000, max_minutes=0.5 / 60)
    m = SlowToy(dropout=0.0)
    trainer = Trainer(cfg, m, ToyData())
    before = params(m)
    n = trainer.calibrate_total_steps(warmup_steps=1, measure_steps=3)
    assert 1 <= n <= 0.5 / 0.01 and trainer.total_steps == n
    assert trainer.lr_schedule.T_max == n
    for k, v in params(m).items():  # weights restored after timing
        assert torch.equal(v, before[k]), k
    res = trainer.fit()
    assert res.step <= res.total_steps
    # a resumed run keeps the calibrated (and re-fitted) horizon
    assert load_checkpoint(res.checkpoint)["explicit_total_steps"] is True
    assert load_checkpoint(res.checkpoint)["total_steps"] == res.total_steps


def test_calibration_fits_the_schedules_to_max_steps_when_it_binds_first(tmp_path):
    """A generous time budget with train.max_steps (what `visrep bench --steps N` runs): the schedules end
    at max_steps, not at what the time would allow (they stayed at their peak before)."""
    cfg = make_cfg(tmp_path, epochs=1000, max_minutes=60.0, max_steps=6)
    trainer = Trainer(cfg, SlowToy(dropout=0.0), ToyData())
    assert trainer.calibrate_total_steps(warmup_steps=1, measure_steps=2) == 6
    assert trainer.total_steps == 6 and trainer.lr_schedule.T_max == 6
    res = trainer.fit()
    assert res.step == 6 and res.total_steps == 6


def test_refit_horizon_uses_the_measured_pace():
    from visrep.engine.budget import refit_horizon

    assert refit_horizon(100, step=10, start_step=0, run_seconds=1.0, remaining=9.0) is None  # too early
    # 50 steps in 5 s, 10 s left: 0.99 * 100 more steps
    assert refit_horizon(100, step=50, start_step=0, run_seconds=5.0, remaining=10.0) == 50 + 99
    assert refit_horizon(100, step=50, start_step=0, run_seconds=10.0, remaining=10.1) is None  # < 1 %


def test_a_pessimistic_calibration_is_corrected_during_the_run(tmp_path):
    cfg = make_cfg(tmp_path, epochs=1000, max_minutes=1.0 / 60)
    trainer = Trainer(cfg, SlowToy(dropout=0.0), ToyData())
    n = trainer.calibrate_total_steps(warmup_steps=1, measure_steps=3, safety=0.4)
    res = trainer.fit()
    assert res.total_steps > n  # the horizon grew to what the budget allows
    assert trainer.lr_schedule.T_max == res.total_steps


# ------------------------------------------------------------------------------------------------
# (e) schedules: the official values


def _official_lr(t, start, ref, final, warmup, T_max):
    """The reference formula at counter value t (the official object increments before use)."""
    if t < warmup:
        return start + t / warmup * (ref - start)
    p = (t - warmup) / (T_max - warmup)
    return max(final, final + (ref - final) * 0.5 * (1 + math.cos(math.pi * p)))


def test_warmup_cosine_matches_official_values():
    s = WarmupCosine(start_lr=2e-4, ref_lr=1e-3, final_lr=1e-6, warmup_steps=10, T_max=100)
    assert s.lr_at(0) == pytest.approx(2.8e-4)     # counter 1: 2e-4 + 0.1 * 8e-4
    assert s.lr_at(4) == pytest.approx(6e-4)       # counter 5: half-way through warmup
    assert s.lr_at(9) == pytest.approx(1e-3)       # counter 10: peak
    assert s.lr_at(54) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))  # cosine half-way
    assert s.lr_at(99) == pytest.approx(1e-6)      # end of the horizon
    for i in range(120):
        assert s(i) == pytest.approx(_official_lr(i + 1, 2e-4, 1e-3, 1e-6, 10, 100))


def test_cosine_wd_matches_official_values():
    s = CosineWD(ref_wd=0.04, final_wd=0.4, T_max=100)
    assert s.wd_at(0) == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi / 100)))
    assert s.wd_at(49) == pytest.approx(0.22)
    assert s.wd_at(99) == pytest.approx(0.4)
    # never beyond final_wd (the official clamp); past T_max the official cosine turns back
    assert max(s(i) for i in range(300)) == pytest.approx(0.4)
    assert min(CosineWD(0.4, 0.04, 100)(i) for i in range(300)) == pytest.approx(0.04)


def test_momentum_schedules():
    assert linear_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert linear_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert linear_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert linear_momentum(100, 125.0, 0.996, 1.0) == pytest.approx(0.996 + 0.004 * 0.8)  # MSN 1.25x
    assert cosine_momentum(0, 100, 0.992, 1.0) == pytest.approx(0.992)
    assert cosine_momentum(50, 100, 0.992, 1.0) == pytest.approx(0.996)
    assert cosine_momentum(100, 100, 0.992, 1.0) == 1.0


def test_build_schedules_uses_ipe_scale():
    oc = OptimConfig(lr=1e-3, start_lr=2e-4, final_lr=1e-6, warmup_epochs=2, ipe_scale=1.25)
    lr, wd = build_schedules(oc, steps_per_epoch=10, total_steps=100)
    assert (lr.warmup_steps, lr.T_max, wd.T_max) == (20, 125, 125)


def test_trainer_applies_per_group_schedules(tmp_path):
    """lr_scale, wd_scale, wd_exclude at every step; freeze_until: lr 0 (weights unchanged) until then."""
    method = ToyMethod()
    method.freeze_head = 2
    head0 = params(method.head)
    trainer = Trainer(make_cfg(tmp_path, "frozen", max_steps=2), method, ToyData())
    trainer.fit()
    lr1, wd1 = trainer.lr_schedule(1), trainer.wd_schedule(1)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([lr1, lr1, 0.0])
    assert [g["weight_decay"] for g in groups] == pytest.approx([wd1, 0.0, 0.5 * wd1])
    for k, v in params(method.head).items():
        assert torch.equal(v, head0[k]), k  # frozen for steps 0 and 1

    trainer = Trainer(make_cfg(tmp_path, max_steps=3), method, ToyData())
    trainer.fit()
    lr2, wd2 = trainer.lr_schedule(2), trainer.wd_schedule(2)
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([lr2, lr2, 0.5 * lr2])
    assert [g["weight_decay"] for g in groups] == pytest.approx([wd2, 0.0, 0.5 * wd2])
    assert any(not torch.equal(v, head0[k]) for k, v in params(method.head).items())


def test_build_optimizer_variants():
    m = ToyMethod()
    for name in ("adamw", "sgd"):
        opt = build_optimizer(m.param_groups(), OptimConfig(name=name, weight_decay=0.1))
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1]
    for name in ("sgd_c", "adam_c", "rmsprop_c"):
        opt = build_optimizer(m.param_groups(), OptimConfig(name=name, topc=3))
        assert len(opt.param_groups) == 3


def test_ema_update():
    online = nn.Linear(3, 2)
    target = make_target(online)
    with torch.no_grad():
        online.weight.add_(1.0)
    expected = 0.9 * target.weight + 0.1 * online.weight
    ema_update_(target, online, 0.9)
    assert torch.allclose(target.weight, expected) and not target.weight.requires_grad


def test_online_knn_and_logs(tmp_path):
    cfg = make_cfg(tmp_path, epochs=2, online_knn=True, online_knn_samples=32)
    res = train(cfg, ToyMethod(), ToyData(), eval_data=ToyData(seed=1))
    assert len(res.knn) == 2 and all(0 <= r["knn_top1_k10"] <= 100 for r in res.knn)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 + 2  # 16 steps / log_every 2, plus 2 k-NN records
    assert (tmp_path / "run" / "config.yaml").is_file()
    rec = res.history[0]
    assert {"step", "epoch", "lr", "wd", "loss", "loss_ce", "images_per_sec", "elapsed"} <= set(rec)


# ------------------------------------------------------------------------------------------------
# (f) config errors


@pytest.fixture
def toy_registry():
    from toy_method import register_toy

    register_toy()  # the contract toy (tests/toy_method.py) as method.name=toy


def test_config_errors_name_the_key(toy_registry):
    cfg = load_config(None, ["method.name=toy", "train.epochs=3", "optim.betas=0.9,0.95"])
    assert cfg.train.epochs == 3 and cfg.optim.betas == (0.9, 0.95) and cfg.method.hidden == 16
    with pytest.raises(ConfigError, match=r"train\.bogus"):
        load_config(None, ["method.name=toy", "train.bogus=1"])
    with pytest.raises(ConfigError, match=r"method\.hiden"):
        load_config(None, ["method.name=toy", "method.hiden=3"])
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["method.name=toy", "optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"optim\.name.*'adamw'"):
        load_config(None, ["method.name=toy", "optim.name=lamb"])
    with pytest.raises(ConfigError, match=r"method\.name"):
        load_config(None, ["method.name=nope"])


def test_optimizer_defaults_follow_the_name():
    """optim.name=sgd_c alone gives the reference optimizer: nothing inherited from the I-JEPA recipe."""
    from visrep.optim import SGDC, RMSpropC
    from visrep.runner import DEMO_CONFIG

    with pytest.warns(UserWarning, match="not carried over"):
        oc = load_config(DEMO_CONFIG, ["optim.name=sgd_c"]).optim
    assert (oc.lr, oc.start_lr, oc.final_lr, oc.warmup_epochs) == (1e-3, 1e-3, 1e-3, 0.0)
    assert (oc.momentum, oc.weight_decay, oc.final_weight_decay) == (0.0, 0.0, 0.0)
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(2, 2))]}], oc)
    assert isinstance(opt, SGDC) and opt.defaults["momentum"] == 0.0 and opt.defaults["weight_decay"] == 0.0
    lr, wd = build_schedules(oc, steps_per_epoch=10, total_steps=100)
    assert {lr(i) for i in range(100)} == {1e-3} and {wd(i) for i in range(100)} == {0.0}

    with pytest.warns(UserWarning):
        oc = load_config(DEMO_CONFIG, ["optim.name=rmsprop_c", "optim.lr=0.05"]).optim
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(2, 2))]}], oc)
    assert isinstance(opt, RMSpropC) and opt.defaults["lr"] == 0.05 and opt.defaults["momentum"] == 0.0
    kept = load_config(DEMO_CONFIG).optim  # the recipe's own optimizer keeps the recipe's values
    assert (kept.name, kept.lr, kept.final_weight_decay) == ("adamw", 2e-3, 0.4)


def test_method_config_rejected_before_any_data(tmp_path):
    from visrep.runner import DEMO_CONFIG

    with pytest.raises(ConfigError, match=r"model\.embed_dim=96 must be divisible"):
        load_config(DEMO_CONFIG, ["model.num_heads=5", f"data.root={tmp_path / 'nonexistent'}"])


# ------------------------------------------------------------------------------------------------
# compile policy: compiled steps equal eager ones; a compiler failure falls back to eager, once


def test_compiled_steps_match_eager(tmp_path):
    eager = train(make_cfg(tmp_path, "eager", compile=False), EMAToy(), ToyData())
    compiled = train(make_cfg(tmp_path, "compiled", compile=True, compile_backend="aot_eager"), EMAToy(), ToyData())
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-6)


def test_compile_failure_falls_back_to_eager(tmp_path):
    import warnings

    from torch._dynamo import register_backend

    def failing(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    register_backend(failing, name="visrep_test_failing")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fell_back = train(make_cfg(tmp_path, "fallback", compile=True, compile_backend="visrep_test_failing"),
                          EMAToy(), ToyData())
    msgs = [str(w.message) for w in caught if "torch.compile failed" in str(w.message)]
    assert len(msgs) == 1 and "no C++ compiler" in msgs[0]
    eager = train(make_cfg(tmp_path, "eager", compile=False), EMAToy(), ToyData())
    assert fell_back.losses == eager.losses


def test_compile_default_is_off_on_cpu(tmp_path):
    assert make_cfg(tmp_path).train.compile is None
    trainer = Trainer(make_cfg(tmp_path), EMAToy(), ToyData())
    assert trainer.compile_pending is False and trainer.model is trainer.eager_model


def test_schedule_offset_follows_the_method_and_the_config(tmp_path):
    """Step i uses the schedules at i + offset: 1 by default (I-JEPA / MSN counters incremented before
    use), 0 for a method whose official scheduler is stepped after the optimizer (PAWS), and
    ``optim.schedule_offset`` overrides the method."""
    import dataclasses

    def lrs(method, **optim_kw):
        cfg = make_cfg(tmp_path, epochs=4)
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, start_lr=0.0, lr=1.0, warmup_epochs=1,
                                                                 **optim_kw))
        trainer = Trainer(cfg, method, ToyData())
        return [trainer.lr_schedule(i) for i in range(3)], trainer.steps_per_epoch

    (a, spe) = lrs(ToyMethod())
    assert a == pytest.approx([1 / spe, 2 / spe, 3 / spe])
    after = ToyMethod()
    after.schedule_offset = 0
    assert lrs(after)[0] == pytest.approx([0.0, 1 / spe, 2 / spe])
    assert lrs(after, schedule_offset=1)[0] == pytest.approx(a)
