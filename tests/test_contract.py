"""One contract test for every registered method (and the toy of ``toy_method.py``).

A method's tiny recipe is ``visrep/configs/<name>/tiny.yaml`` (or ``tests/configs/<name>/tiny.yaml``).
For each method: two steps train with finite terms; an interrupted + resumed run equals an
uninterrupted one step for step (losses and every tensor of the state); 2 gloo processes x batch B
equal 1 process x batch 2B after an optimizer step and the method's hooks (float64); every exported
module rebuilds from its safetensors file; features have the documented shape.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from toy_method import register_toy
from visrep.config import load_config
from visrep.methods import METHODS, build_method
from visrep.runner import data_info, load_split

register_toy()
CONFIG_DIRS = [Path(__file__).resolve().parents[1] / "visrep" / "configs", Path(__file__).resolve().parent / "configs"]
NAMES = sorted(METHODS)
B = 4


def tiny_config(name: str, out_dir, *overrides: str):
    for d in CONFIG_DIRS:
        path = d / name / "tiny.yaml"
        if path.is_file():
            return load_config(path, [f"train.out_dir={out_dir}", *overrides])
    raise AssertionError(f"method {name!r} has no tiny recipe: add visrep/configs/{name}/tiny.yaml")


def build(cfg):
    ds = load_split(cfg, "train")
    torch.manual_seed(cfg.train.seed)
    return build_method(cfg, data_info(cfg, ds)), ds


def state(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory):
    """Each method trained for two steps (the checkpoint is reused by the export test)."""
    from visrep.engine import train

    out = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config(request.param, out, "train.max_steps=2")
    method, ds = build(cfg)
    result = train(cfg, method, ds)
    return request.param, cfg, method, result


def test_two_steps_finite(trained):
    name, cfg, method, result = trained
    assert result.step == 2 and len(result.losses) == 2
    for record in result.history:
        bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"{name}: non-finite logged terms {bad}"
    ck = torch.load(result.checkpoint, weights_only=True)
    assert ck["data_info"] == method.data_info.to_dict()


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_exact(name, tmp_path):
    from visrep.engine import train

    cfg = tiny_config(name, tmp_path / "straight", "train.max_steps=4")
    straight, ds = build(cfg)
    full = train(cfg, straight, ds)

    cut = tiny_config(name, tmp_path / "cut", "train.max_steps=2")
    first, ds = build(cut)
    part1 = train(cut, first, ds)
    again = tiny_config(name, tmp_path / "cut", "train.max_steps=4")
    second, ds = build(again)  # a fresh process would rebuild from scratch, then resume
    part2 = train(again, second, ds, resume=True)

    assert part1.losses + part2.losses == full.losses
    want, got = state(straight), state(second)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{name}: {k} differs after resume"


def _as64(x):
    if isinstance(x, torch.Tensor):
        return x.double() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _as64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_as64(v) for v in x)
    return x


def _shard(x, rank: int, world: int, n: int):
    """This rank's share of every per-sample entry (leading size ``n``) of a prepared batch."""
    per = n // world
    if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n:
        return x[rank * per:(rank + 1) * per]
    if isinstance(x, dict):
        return {k: _shard(v, rank, world, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        if len(x) == n and not any(isinstance(v, torch.Tensor) for v in x):
            return type(x)(x[rank * per:(rank + 1) * per])
        return type(x)(_shard(v, rank, world, n) for v in x)
    return x


def _one_step(cfg, method, ds, batch) -> tuple[float, dict]:
    from visrep.engine.trainer import Trainer
    from visrep.optim import apply_schedules

    trainer = Trainer(cfg, method, ds)
    info = trainer._step_info(0)
    apply_schedules(trainer.optimizer, info.lr, info.wd, info.step)
    names, vals, _ = trainer._train_step(batch, info, trainer.optimizer)
    return float(vals[names.index("loss")]), state(method)


def _prepared(name: str, out_dir, overrides=()):
    """The method (float64) and the first prepared batch of 2B images (every stream), identical in
    every process (built before the process group exists). ``overrides``: config overrides (variants)."""
    from visrep.engine.trainer import Trainer

    cfg = tiny_config(name, out_dir, f"train.batch_size={2 * B}", *overrides)
    method, ds = build(cfg)
    batches = Trainer(cfg, method, ds).batches(0)
    batch = _as64(next(batches))
    batches.close()
    return cfg, method.double(), ds, batch


def _worker(rank: int, world: int, port: int, name: str, out_dir: str, overrides=()) -> None:
    import dataclasses

    from visrep import distributed as D

    torch.set_num_threads(1)
    try:
        cfg, method, ds, batch = _prepared(name, out_dir, overrides)  # as one process: the same 2B batch
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
        D.init_distributed("gloo")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=B))
        loss, params = _one_step(cfg, method, ds, _shard(batch, rank, world, 2 * B))
        torch.save({"loss": loss, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        D.cleanup()


@pytest.mark.ddp
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_equal_one_process_double_batch(name, tmp_path, free_port):
    cfg, method, ds, batch = _prepared(name, tmp_path)
    loss, params = _one_step(cfg, method, ds, batch)
    mp.start_processes(_worker, args=(2, free_port, name, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["loss"] == pytest.approx(loss, rel=1e-10, abs=1e-12), name
        for k, v in params.items():
            torch.testing.assert_close(out["params"][k], v, rtol=1e-9, atol=1e-11, msg=f"{name}: {k}")


def test_export_round_trip(trained, tmp_path):
    from visrep.hub import export_safetensors, load_exported
    from visrep.runner import export_checkpoint

    name, cfg, method, result = trained
    exports = method.export_modules()
    assert exports, f"{name} exports nothing"
    for which, export in exports.items():
        path = export_safetensors(export.module, tmp_path / f"{which}.safetensors", metadata=export.metadata)
        rebuilt = load_exported(path)
        want, got = export.module.state_dict(), rebuilt.state_dict()
        assert want.keys() == got.keys(), which
        for k in want:
            assert torch.equal(want[k].cpu(), got[k]), f"{name}.{which}: {k}"
    # through the CLI's path: the default module of a training checkpoint
    default = load_exported(export_checkpoint(result.checkpoint, str(tmp_path / "default.safetensors")))
    assert type(default) is type(next(iter(exports.values())).module)


def test_features_shape(trained):
    name, cfg, method, result = trained
    ds = load_split(cfg, "test")
    images = ds.tensors()[0][:5]
    method.eval()
    feats = method.features(images)
    assert feats.shape == (5, method.feature_dim), f"{name}: {tuple(feats.shape)}"
    assert torch.isfinite(feats).all()
    baseline = method.random_init_baseline()
    assert type(baseline) is type(method) and not baseline.training
    assert baseline.features(images).shape == feats.shape
    assert method.feature_description
    # the seed picks the init: the run's own by default, another one on request (averaged baselines)
    first = dict(baseline.state_dict())
    same, other = method.random_init_baseline(seed=cfg.train.seed), method.random_init_baseline(seed=cfg.train.seed + 1)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in first.items())
    assert any(v.is_floating_point() and v.numel() > 1 and not torch.equal(v, other.state_dict()[k])
               for k, v in first.items())


def test_a_method_declares_its_own_protocol_and_the_runner_finds_it(tmp_path):
    """The toy's ``agreement`` protocol (declared in tests/toy_method.py only, its setting in its own
    config section) runs through ``visrep eval`` like any generic one, and equals the same number
    computed here from the reloaded checkpoint; asking for a protocol the method does not answer
    names the ones it does."""
    import torch.nn.functional as F

    from visrep.cli import main
    from visrep.data.splits import eval_images, uint8_eval_transform
    from visrep.engine import train
    from visrep.runner import evaluate_checkpoint, known_protocols, load_trained

    cfg = tiny_config("toy", tmp_path / "run", "train.max_steps=3", "method.agreement_samples=20")
    method, ds = build(cfg)
    ckpt = train(cfg, method, ds).checkpoint
    results, _ = evaluate_checkpoint([ckpt], protocols=["agreement"], out_dir=str(tmp_path / "eval"))
    (key, value), = results["method_protocols"].items()
    assert key.startswith("agreement/")

    _, again, _ = load_trained(ckpt)
    images, _ = eval_images(load_split(cfg, "test", transform=uint8_eval_transform(cfg.data.image_size)),
                            cfg.data.image_size)
    x = again.normalize(images[:20])
    with torch.no_grad():
        expected = F.cosine_similarity(again.target(x), again.encoder(x)).mean().item()
    assert value == pytest.approx(expected, abs=1e-6)
    assert expected < 0.9999  # three EMA steps: target and encoder differ, so the check has teeth

    assert "agreement" in known_protocols()
    assert main(["eval", "--list-protocols"]) == 0
    with pytest.raises(ValueError, match="agreement"):  # names what the toy does answer
        evaluate_checkpoint([ckpt], protocols=["mrr"], out_dir=str(tmp_path / "eval2"))
