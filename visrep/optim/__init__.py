"""Optimizers, schedules and EMA helpers."""
from .critical import SGD_C, SGDC, Adam_C, AdamC, RMSprop_C, RMSpropC
from .ema import ema_update_, make_target
from .factory import OPTIMIZER_DEFAULTS, apply_schedules, build_optimizer, resolve_optim_defaults
from .groups import decay_groups, no_decay_default, no_decay_official_jepa
from .schedules import (
    CosineWD,
    WarmupCosine,
    build_schedules,
    cosine_momentum,
    cosine_schedule,
    linear_momentum,
    schedule_horizon,
)

__all__ = [
    "OPTIMIZER_DEFAULTS",
    "decay_groups",
    "no_decay_default",
    "no_decay_official_jepa",
    "resolve_optim_defaults",
    "CosineWD",
    "WarmupCosine",
    "apply_schedules",
    "build_optimizer",
    "build_schedules",
    "cosine_momentum",
    "cosine_schedule",
    "ema_update_",
    "linear_momentum",
    "make_target",
    "schedule_horizon",
    "SGDC",
    "AdamC",
    "RMSpropC",
    "SGD_C",
    "Adam_C",
    "RMSprop_C",
]
