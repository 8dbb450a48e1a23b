"""The one abstraction every method shares.

A method is an ``nn.Module`` that owns everything method-specific (EMA teachers, predictors,
prototypes, centres) and exposes a handful of hooks. The engine only calls these hooks, so adding a
method never touches the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn


@dataclass
class Step:
    """Where training is: handed to every hook.

    ``step`` counts optimizer steps already taken (0 for the first batch); ``total_steps`` is the
    length of the whole schedule; ``lr``/``wd`` are the current schedule values.
    """

    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int
    lr: float = 0.0
    wd: float = 0.0

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


class Method(nn.Module):
    """Base class: hooks with sensible defaults; subclasses implement ``training_step``."""

    encoder: nn.Module

    def train_transform(self) -> Callable | None:
        """Per-sample transform for the training dataset (None: the method transforms batches)."""
        return None

    def batch_transform(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Transform a whole uint8/float batch at once (fast in-memory path). Default: identity."""
        return images

    def collate(self) -> Callable | None:
        """A collate function (e.g. I-JEPA block masks); None for the default."""
        return None

    def prepare_batch(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Any:
        """Fast in-memory path: turn a raw uint8 batch into what ``training_step`` takes.

        Must draw all randomness from ``generator`` (the engine seeds it per step and rank, which
        makes resumed runs exact). Default: ``(batch_transform(images), labels)``.
        """
        return self.batch_transform(images, generator), labels

    def forward(self, batch: Any, step: Step) -> dict[str, Tensor]:
        # DDP hooks forward(); the engine calls the (possibly wrapped) module, which lands here.
        return self.training_step(batch, step)

    def training_step(self, batch: Any, step: Step) -> dict[str, Tensor]:
        """Return ``{"loss": scalar, ...}``; extra entries are logged (detached)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        """Called after every optimizer step (EMA updates, centre updates, ...)."""

    def param_groups(self) -> list[dict]:
        """Parameter groups for the optimizer. Default: weight decay on >=2-D weights only."""
        return decay_groups(self)

    def features(self, images: Tensor) -> Tensor:
        """Frozen features for evaluation ([N, D]); default: the encoder's pooled output."""
        return self.encoder(images)

    feature_description: str = "encoder output"


def decay_groups(*modules: nn.Module, **extra) -> list[dict]:
    """Two groups: weights with decay, biases/norms/1-D params/tokens without (``WD_exclude``)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [dict(params=decay, **extra), dict(params=no_decay, weight_decay=0.0, wd_exclude=True, **extra)]
    return [g for g in groups if g["params"]]
