"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

Every schedule here is a function of the global step index ``i`` (the number of optimizer steps
already taken, i.e. ``Step.step``: 0 for the first batch). Nothing is stateful, so a resumed run
only needs the step to get the same values.

Semantics follow the official code: I-JEPA / MSN / StoP's ``WarmupCosineSchedule`` and
``CosineWDSchedule`` keep a counter that starts at 0 and is incremented *before* the value is
computed, at the start of every train step, so train step ``i`` uses the formula at ``t = i + 1``
(``offset=1``, the default). PAWS's (suncet) is a ``LambdaLR`` stepped *after* the optimizer: step ``i``
uses ``t = i`` (``offset=0``; ``Method.schedule_offset``, ``optim.schedule_offset`` overrides).
``lr_at(i)`` / ``wd_at(i)`` return exactly the value of step ``i``.

Horizons: with ``ipe`` iterations per epoch, ``warmup_steps = int(warmup_epochs * ipe)`` and
``T_max = int(ipe_scale * epochs * ipe)`` (MSN: ``ipe_scale = 1.25``, released I-JEPA configs: 1.0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from ``start_lr`` to ``ref_lr``, then cosine towards ``final_lr``.

    With ``t = step + 1``: for ``t < warmup_steps`` the lr is
    ``start_lr + t / warmup_steps * (ref_lr - start_lr)``; afterwards
    ``max(final_lr, final_lr + (ref_lr - final_lr) * 0.5 * (1 + cos(pi * p)))`` with
    ``p = (t - warmup_steps) / (T_max - warmup_steps)``. As in the official code ``p`` is not
    clamped (the horizon is meant to cover the run).
    """

    start_lr: float
    ref_lr: float
    final_lr: float
    warmup_steps: int
    T_max: int
    offset: int = 1                 # step i uses the formula at t = i + offset

    def lr_at(self, step: int) -> float:
        t = step + self.offset
        if t < self.warmup_steps:
            progress = t / max(1, self.warmup_steps)
            return self.start_lr + progress * (self.ref_lr - self.start_lr)
        progress = (t - self.warmup_steps) / max(1, self.T_max - self.warmup_steps)
        cosine = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine)

    __call__ = lr_at


@dataclass(frozen=True)
class CosineWD:
    """Cosine weight decay ``ref_wd -> final_wd`` over ``T_max`` steps (clamped at ``final_wd``).

    With ``t = step + 1``: ``final_wd + (ref_wd - final_wd) * 0.5 * (1 + cos(pi * t / T_max))``,
    then ``max(final_wd, .)`` when the schedule decreases, ``min(final_wd, .)`` when it increases
    (I-JEPA: 0.04 -> 0.4). Applied only to parameter groups without ``wd_exclude``.
    """

    ref_wd: float
    final_wd: float
    T_max: int
    offset: int = 1

    def wd_at(self, step: int) -> float:
        t = step + self.offset
        progress = t / max(1, self.T_max)
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)

    __call__ = wd_at


def schedule_horizon(total_steps: int, ipe_scale: float = 1.0) -> int:
    """``T_max`` of the official code: ``int(ipe_scale * epochs * ipe)`` = ``int(ipe_scale * total_steps)``."""
    return int(ipe_scale * total_steps)


def build_schedules(optim_cfg, steps_per_epoch: int, total_steps: int, offset: int = 1
                    ) -> tuple[WarmupCosine, CosineWD]:
    """The lr and wd schedules of an :class:`~visrep.config.OptimConfig` for a run of ``total_steps``.

    ``optim_cfg.lr`` etc. are used as given (any batch-size scaling of the lr is the caller's job).
    """
    T_max = schedule_horizon(total_steps, optim_cfg.ipe_scale)
    lr = WarmupCosine(
        start_lr=optim_cfg.start_lr,
        ref_lr=optim_cfg.lr,
        final_lr=optim_cfg.final_lr,
        warmup_steps=int(optim_cfg.warmup_epochs * steps_per_epoch),
        T_max=T_max,
        offset=offset,
    )
    wd = CosineWD(ref_wd=optim_cfg.weight_decay, final_wd=optim_cfg.final_weight_decay, T_max=T_max, offset=offset)
    return lr, wd


def linear_momentum(step: int, total: float, m0: float = 0.996, m1: float = 1.0) -> float:
    """I-JEPA / MSN / StoP EMA momentum for train step ``step`` (0-based).

    ``m = m0 + step * (m1 - m0) / total`` with ``total = ipe * epochs * ipe_scale`` (a float, not
    truncated). The official generator yields ``i = 0`` for the first update, so ``step`` is used
    as is (no +1). The value is not clamped: past ``total`` it keeps growing as the formula says;
    callers that can run past the horizon should ``min(., m1)``.
    """
    return m0 + step * (m1 - m0) / total


def cosine_momentum(step: int, total: int, m0: float = 0.992, m1: float = 1.0) -> float:
    """DINOv2 teacher momentum (``CosineScheduler`` without warmup or freeze).

    ``m = m1 + 0.5 * (m0 - m1) * (1 + cos(pi * step / total))`` for ``0 <= step < total``;
    ``m1`` from ``total`` on (the official scheduler returns its final value past the end).
    """
    if step >= total:
        return m1
    return m1 + 0.5 * (m0 - m1) * (1.0 + math.cos(math.pi * step / total))


def cosine_schedule(
    step: int,
    total: int,
    base: float,
    final: float,
    *,
    warmup: int = 0,
    start_warmup: float = 0.0,
    freeze: int = 0,
) -> float:
    """DINOv2 ``CosineScheduler`` value at ``step``: ``freeze`` steps at 0, linear warmup from
    ``start_warmup`` to ``base`` over ``warmup`` steps, cosine ``base -> final`` over the remaining
    ``total - freeze - warmup`` steps, then ``final``.
    """
    if step >= total:
        return final
    if step < freeze:
        return 0.0
    s = step - freeze
    if s < warmup:
        # np.linspace(start_warmup, base, warmup): endpoint included
        return start_warmup + (base - start_warmup) * (s / (warmup - 1) if warmup > 1 else 0.0)
    s -= warmup
    n = total - freeze - warmup
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * s / n))


__all__ = [
    "CosineWD",
    "WarmupCosine",
    "build_schedules",
    "cosine_momentum",
    "cosine_schedule",
    "linear_momentum",
    "schedule_horizon",
]
