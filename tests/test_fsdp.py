"""FSDP2 (``train.parallel=fsdp``) against DDP on 2 gloo processes (CPU, float64).

For I-JEPA and DINOv2 (their tiny recipes; EMA targets updated from the sharded student) the same
prepared batches give, step for step, the same losses and the same checkpoint (model and optimizer,
whole tensors in DDP's format) under DDP and under FSDP. Checkpoints are interchangeable: FSDP resumes
a DDP checkpoint and one process (batch 2B) continues from an FSDP checkpoint, both exactly as DDP
continued; ``load_trained`` (eval, export) rebuilds the method from an FSDP checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from test_contract import B, _as64, _shard, build, tiny_config

from visrep.config import ConfigError, load_config

STEPS, CUT = 3, 2  # steps of each run; the step of the checkpoint the resumed runs start from
# (method, overrides): the tiny recipes, and DINOv2 with activation checkpointing, a separate iBOT head
# (unused on a process without masked crops) and global gradient clipping combined with FSDP
CASES = {"ijepa": ("ijepa", ()), "dinov2": ("dinov2", ()),
         "dinov2-ckpt-ibot-clip": ("dinov2", ("model.grad_checkpointing=true", "method.ibot_separate_head=true",
                                              "method.ibot_n_prototypes=64", "method.ibot_hidden_dim=32",
                                              "method.ibot_bottleneck_dim=16", "optim.clip_grad=1.0"))}


def _prepared_batches(name: str, out_dir, overrides=()) -> tuple:
    """The config (batch 2B), the dataset and the first STEPS prepared batches of 2B images (float64),
    the same in every process (built before the process group exists)."""
    from visrep.engine.trainer import Trainer

    cfg = tiny_config(name, out_dir, f"train.batch_size={2 * B}", *overrides)
    method, ds = build(cfg)
    batches = Trainer(cfg, method, ds).batches(0)
    prepared = [_as64(next(batches)) for _ in range(STEPS)]
    batches.close()
    return cfg, ds, prepared


def _run(cfg, ds, batches, *, parallel: str, out_dir: Path, rank: int, world: int,
         resume: Path | None = None) -> list[float]:
    """A fresh float64 method trained to STEPS on ``batches`` (each process its share), from scratch or
    resumed from ``resume``; writes ``out_dir/cut.pt`` (after CUT steps) and ``out_dir/last.pt``."""
    from visrep import distributed as D
    from visrep.engine.trainer import Trainer
    from visrep.optim import apply_schedules

    train = dataclasses.replace(cfg.train, batch_size=2 * B // world, parallel=parallel, out_dir=str(out_dir))
    cfg = dataclasses.replace(cfg, train=train)
    method, _ = build(cfg)
    trainer = Trainer(cfg, method.double(), ds)
    if parallel == "fsdp" and world > 1:  # exactly the trained parameters are shards
        trained = {id(p) for g in method.param_groups() for p in g["params"]}
        for n, p in method.named_parameters():
            assert D.is_dtensor(p) == (id(p) in trained), f"{n}: sharded {D.is_dtensor(p)}"
    start = 0
    if resume and world > 1:
        start = trainer._resume(str(resume))["step"]
    elif resume:  # one process: another per-process batch, which resume refuses; load the states
        state = torch.load(resume, weights_only=True)
        method.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
    losses = []
    for s in range(start, STEPS):
        info = trainer._step_info(s)
        apply_schedules(trainer.optimizer, info.lr, info.wd, info.step)
        batch = _shard(batches[s], rank, world, 2 * B) if world > 1 else batches[s]
        names, vals, _ = trainer._train_step(batch, info, trainer.optimizer)
        losses.append(float(vals[names.index("loss")]))
        if s + 1 == CUT:
            trainer._save(CUT, 0.0, [])
            if D.is_main():
                shutil.copy(trainer.last_path, out_dir / "cut.pt")
            D.barrier()
    trainer._save(STEPS, 0.0, [])
    return losses


def _worker(rank: int, world: int, port: int, name: str, out_dir: str, overrides=()) -> None:
    from visrep import distributed as D

    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        cfg, ds, batches = _prepared_batches(name, out, overrides)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        D.init_distributed("gloo")
        run = dict(rank=rank, world=world)
        losses = {"ddp": _run(cfg, ds, batches, parallel="ddp", out_dir=out / "ddp", **run),
                  "fsdp": _run(cfg, ds, batches, parallel="fsdp", out_dir=out / "fsdp", **run),
                  "fsdp_from_ddp": _run(cfg, ds, batches, parallel="fsdp", out_dir=out / "fsdp_from_ddp",
                                        resume=out / "ddp" / "cut.pt", **run)}
        torch.save(losses, out / f"losses{rank}.pt")
    finally:
        D.cleanup()


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k in want:
        g, w = got[k], want[k]
        if isinstance(w, dict):
            _assert_same_state(g, w, f"{what}.{k}")
        elif isinstance(w, torch.Tensor):
            assert not hasattr(g, "device_mesh"), f"{what}.{k}: a DTensor in the checkpoint"
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=f"{what}.{k}")
        elif isinstance(w, list) and w and isinstance(w[0], dict):  # optimizer param_groups
            assert [{**x, "params": x["params"]} for x in g] == w, f"{what}.{k}"
        else:
            assert g == w, f"{what}.{k}"


@pytest.mark.ddp
@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_equals_ddp_and_checkpoints_interchange(case, tmp_path, free_port):
    name, overrides = CASES[case]
    mp.start_processes(_worker, args=(2, free_port, name, str(tmp_path), overrides), nprocs=2, join=True,
                       start_method="fork")
    runs = [torch.load(tmp_path / f"losses{r}.pt", weights_only=True) for r in range(2)]
    assert runs[0] == runs[1]  # every process reports the averaged terms
    ddp = runs[0]["ddp"]
    assert runs[0]["fsdp"] == pytest.approx(ddp, rel=1e-10, abs=1e-12)
    assert runs[0]["fsdp_from_ddp"] == pytest.approx(ddp[CUT:], rel=1e-10, abs=1e-12)

    def ckpt(run: str, which: str = "last.pt") -> dict:
        return torch.load(tmp_path / run / which, weights_only=True)

    want = ckpt("ddp")
    for run in ("fsdp", "fsdp_from_ddp"):
        got = ckpt(run)
        _assert_same_state(got["model"], want["model"], f"{run}: model")
        _assert_same_state(got["optimizer"], want["optimizer"], f"{run}: optimizer")
    _assert_same_state(ckpt("fsdp", "cut.pt")["model"], ckpt("ddp", "cut.pt")["model"], "cut: model")

    # the runner's path (eval, export) rebuilds the method from an FSDP checkpoint
    from visrep.runner import load_trained

    _, loaded, _ = load_trained(tmp_path / "fsdp" / "last.pt")
    _assert_same_state(loaded.state_dict(), {k: v.float() if v.is_floating_point() else v
                                             for k, v in want["model"].items()}, "load_trained")
    # one process (batch 2B) continues the FSDP checkpoint as the 2-process DDP run continued
    cfg, ds, batches = _prepared_batches(name, tmp_path, overrides)
    single = _run(cfg, ds, batches, parallel="fsdp", out_dir=tmp_path / "single", rank=0, world=1,
                  resume=tmp_path / "fsdp" / "cut.pt")
    assert single == pytest.approx(ddp[CUT:], rel=1e-10, abs=1e-12)
    _assert_same_state(ckpt("single")["model"], want["model"], "single: model")


def test_parallel_config():
    cfg = load_config(Path(__file__).resolve().parents[1] / "visrep/configs/ijepa/tiny.yaml", ["train.parallel=fsdp"])
    assert cfg.train.parallel == "fsdp"
    with pytest.raises(ConfigError, match="train.parallel"):
        load_config(Path(__file__).resolve().parents[1] / "visrep/configs/ijepa/tiny.yaml", ["train.parallel=zero"])


def test_default_fsdp_units():
    """Every trained transformer block (encoder and predictor) is a unit; the EMA target's are not."""
    cfg = tiny_config("ijepa", "/tmp/unused")
    method, _ = build(cfg)
    units = method.fsdp_units()
    blocks = [*method.encoder.blocks, *method.predictor.predictor_blocks]
    assert len(units) == len(blocks) and all(any(u is b for b in blocks) for u in units)
    assert not any(u is b for u in units for b in method.target_encoder.blocks)
