"""Losses in float32 while the network runs under autocast (issue 18, item 2).

The engine wraps ``training_step`` in autocast; the official codes compute these losses in float32
(PAWS: ``autocast(enabled=False)`` + ``.float()``; MSN trains in float32; DINOv2 casts to float32 and
turns autocast off for KoLeo; I-JEPA's LayerNorm / smooth-L1 are on CUDA autocast's float32 list).

* Pure losses on clustered embeddings (where bf16 hurts most): under CPU bf16 autocast the loss equals
  the float32 loss to 1e-5 relative, for float32 inputs and for bf16 inputs (vs. their float32 values);
  the same call without the guard (``__wrapped__``) is off by more than 1e-4, so the test can fail.
* Each method's training step: the networks' outputs are fixed (computed in float32 with autocast off,
  rounded to bf16 -- as autocast would hand them over -- and, in the reference run, cast back to
  float32); the step's loss under autocast equals the reference to 1e-5 relative. With every guard of
  ``visrep`` patched out that check fails for the guarded methods (MAE's and the supervised loss are
  float32 by type promotion alone).
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch import Tensor

from visrep.config import load_config
from visrep.engine.batches import BatchSource
from visrep.losses import dino_loss, ibot_loss, jepa_loss, koleo_loss, msn_loss, normalized_targets, paws_loss
from visrep.losses import precision as P
from visrep.methods import build_method
from visrep.methods.base import Step
from visrep.runner import data_info, load_split

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-30))


def clustered(n: int, d: int, centres: Tensor, spread: float, g: torch.Generator) -> Tensor:
    """``n`` rows close to the rows of ``centres`` (cosines near 1: the regime where bf16 logits fail)."""
    idx = torch.arange(n) % centres.shape[0]
    return centres[idx] + spread * torch.randn(n, d, generator=g)


def _cases():
    g = torch.Generator().manual_seed(0)
    d, k = 32, 16
    centres = torch.randn(4, d, generator=g) * 3
    protos = clustered(k, d, centres, 0.05, g)
    B = 8

    def msn(fn):
        return lambda a, t, p: fn(a, t, p, tau=0.1, T=0.25)["loss"]

    def paws(fn):
        def run(av, sv, tv):
            labels = torch.nn.functional.one_hot(torch.arange(12) % 4, 4).float() * 0.9 + 0.1 / 4
            return fn(av, sv, labels, tv, sv.detach(), labels, tau=0.1, T=0.25, multicrop=2)["loss"]
        return run

    def dino(fn):
        return lambda s, t: fn(s, t, 0.1)

    def ibot(fn):
        masks = torch.ones(2, 4, dtype=torch.bool)
        return lambda s, t: fn(s, t, masks, 0.1)

    def koleo(fn):
        return lambda x: fn(x)

    def jepa(norm, loss):
        return lambda z, h: loss(z, norm(h))

    logits = 20 + 0.3 * torch.randn(8, 64, generator=g)
    probs = (logits + 0.1 * torch.randn(8, 64, generator=g)).softmax(-1)
    h = clustered(B, d, centres, 0.5, g)
    return {
        "msn": (msn(msn_loss), msn(msn_loss.__wrapped__),
                (clustered(2 * B, d, centres, 0.05, g), clustered(B, d, centres, 0.05, g), protos)),
        "paws": (paws(paws_loss), paws(paws_loss.__wrapped__),
                 (clustered(4 * B, d, centres, 0.05, g), clustered(12, d, centres, 0.05, g),
                  clustered(2 * B, d, centres, 0.05, g))),
        "dino": (dino(dino_loss), dino(dino_loss.__wrapped__), (logits, probs)),
        "ibot": (ibot(ibot_loss), ibot(ibot_loss.__wrapped__), (logits, probs.flip(0))),
        "koleo": (koleo(koleo_loss), koleo(koleo_loss.__wrapped__), (clustered(32, d, centres, 0.01, g),)),
        "jepa": (jepa(normalized_targets, jepa_loss), jepa(normalized_targets.__wrapped__, jepa_loss.__wrapped__),
                 # predictions close to their targets: a small loss, bf16 targets' rounding dominates
                 (normalized_targets(h) + 0.01 * torch.randn(B, d, generator=g), h)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_pure_loss_is_float32_under_autocast(name):
    guarded, unguarded, inputs = CASES[name]
    want = guarded(*inputs)
    assert want.dtype == torch.float32
    low = tuple(x.to(BF16) for x in inputs)
    want_low = guarded(*(x.float() for x in low))          # the bf16 values, in float32
    with autocast():
        got, got_low = guarded(*inputs), guarded(*low)
        bad, bad_low = unguarded(*inputs), unguarded(*low)
    assert got.dtype == got_low.dtype == torch.float32
    assert rel(got, want) < 1e-5 and rel(got_low, want_low) < 1e-5, (rel(got, want), rel(got_low, want_low))
    # the same inputs without the guard: bf16 loses far more (so this test can fail)
    assert max(rel(bad, want), rel(bad_low, want_low)) > 1e-4, (rel(bad, want), rel(bad_low, want_low))


def test_float64_stays_float64_and_integers_untouched():
    x, i = torch.randn(3, dtype=torch.float64), torch.arange(3)
    with autocast(), P.fp32_loss(x, i, x.to(BF16), None) as (a, b, c, d):
        assert a.dtype == torch.float64 and b.dtype == torch.int64 and c.dtype == torch.float32 and d is None
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")


# -- each method's step ---------------------------------------------------------------------------
# the calls whose outputs are the network's (wrapped: float32 inside, bf16 out); the rest of the
# step is the loss part. ``guarded``: the method relies on a guard (not only on type promotion).
MODEL_CALLS = {
    "msn": (["encoder", "head", "target_encoder", "target_head"], True),
    "pmsn": (["encoder", "head", "target_encoder", "target_head"], True),
    "paws": (["embed"], True),
    "dinov2": (["student.backbone", "student.dino_head", "teacher.backbone", "teacher.dino_head"], True),
    "ijepa": (["encoder", "target_encoder", "predictor"], True),
    "iwm": (["encoder", "target_encoder", "predictor"], True),
    "stop": (["encoder", "target_encoder", "predictor"], True),
    "mae": (["encoder", "decode"], False),
    "supervised": (["logits"], False),
}
WRAPPED_METHODS = ("forward", "forward_features", "get_intermediate_layers")


def _round(x, keep_bf16: bool):
    if isinstance(x, Tensor) and x.is_floating_point():
        y = x.to(BF16)
        return y if keep_bf16 else y.float()
    if isinstance(x, (list, tuple)):
        return type(x)(_round(v, keep_bf16) for v in x)
    if isinstance(x, dict):
        return {k: _round(v, keep_bf16) for k, v in x.items()}
    return x


def _fixed_output(fn):
    def run(*args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        with torch.autocast("cpu", enabled=False):
            out = fn(*P.fp32(args), **P.fp32(kwargs))
        return _round(out, keep_bf16=on)   # autocast hands bf16 over; the reference its float32 value
    return run


def _wrap(method, paths):
    for path in paths:
        owner, name = method, path
        *parents, name = path.split(".")
        for p in parents:
            owner = owner[p] if isinstance(owner, torch.nn.ModuleDict) else getattr(owner, p)
        target = owner[name] if isinstance(owner, torch.nn.ModuleDict) else getattr(owner, name)
        if isinstance(target, torch.nn.Module):
            for attr in WRAPPED_METHODS:
                if hasattr(target, attr):
                    setattr(target, attr, _fixed_output(getattr(target, attr)))
        else:
            setattr(owner, name, _fixed_output(target))
    return method


@contextlib.contextmanager
def _no_guards():
    """Every guard of visrep patched out: ``fp32_loss`` / ``autocast_off`` pass through,
    ``float32_loss``-decorated functions replaced by the undecorated ones."""
    saved = []
    passthrough = contextlib.contextmanager(lambda *xs: (yield xs))
    fp32_loss, autocast_off, wrapper_code = P.fp32_loss, P.autocast_off, P.float32_loss(lambda: None).__code__
    for mod in [m for n, m in list(sys.modules.items()) if n.startswith("visrep.") and m is not None]:
        for attr, value in list(vars(mod).items()):
            new = None
            if value is fp32_loss:
                new = passthrough
            elif value is autocast_off:
                new = contextlib.nullcontext
            elif callable(value) and getattr(value, "__wrapped__", None) is not None and \
                    getattr(value, "__code__", None) is wrapper_code:
                new = value.__wrapped__
            if new is not None:
                saved.append((mod, attr, value))
                setattr(mod, attr, new)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def _step_loss(make, batch, step, paths, under_autocast: bool) -> Tensor:
    m = _wrap(make(), paths)     # a fresh copy (steps change state: DINOv2's centres)
    torch.manual_seed(0)
    with autocast() if under_autocast else contextlib.nullcontext():
        return m.training_step(batch, step)["loss"].detach()


@pytest.mark.parametrize("name", sorted(MODEL_CALLS))
def test_training_step_loss_is_float32_under_autocast(name, tmp_path):
    cfg = load_config(f"visrep/configs/{name}/tiny.yaml", [f"train.out_dir={tmp_path}"])
    ds = load_split(cfg, "train")

    def make():
        torch.manual_seed(cfg.train.seed)
        return build_method(cfg, data_info(cfg, ds))

    batch = next(iter(BatchSource(cfg, make(), ds, torch.device("cpu"))(0)))
    step = Step(step=3, epoch=0, total_steps=100, steps_per_epoch=10)
    paths, guarded = MODEL_CALLS[name]
    want = _step_loss(make, batch, step, paths, under_autocast=False)
    got = _step_loss(make, batch, step, paths, under_autocast=True)
    assert got.dtype == torch.float32
    assert rel(got, want) < 1e-5, rel(got, want)
    if guarded:
        with _no_guards():
            bad = _step_loss(make, batch, step, paths, under_autocast=True)
        # without them the same check fails
        assert rel(bad, want) > 1e-5, f"{name}: without the guards the step's loss is as exact ({rel(bad, want)})"
