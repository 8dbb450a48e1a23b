"""Losses in float32 while the network runs under autocast (the official codes' precision).

The engine wraps the whole ``training_step`` in autocast (``train.precision``), so without a guard
the matrix products of a loss (soft nearest neighbours, KoLeo's neighbours, ...) run in bf16. The
official codes compute these losses in float32: PAWS disables autocast around its loss and calls
``.float()`` on the embeddings, MSN trains in float32, DINOv2 casts its targets / CE inputs to float32
and disables autocast for KoLeo, I-JEPA's LayerNorm and smooth-L1 are on CUDA autocast's float32 list.

    with fp32_loss(h, z) as (h, z):     # autocast off on every device where it is on; bf16 -> fp32
        loss = ...
    @float32_loss                        # the same for a pure loss function's tensor arguments

float64 tensors stay float64 (the parity tests); integer tensors are untouched. The image-text
losses (CLIP, SigLIP, Llip) are not guarded: open_clip and the official Llip code compute them under
autocast. Specification and notes: docs/losses/precision.md
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["autocast_off", "float32_loss", "fp32", "fp32_loss"]

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")
F = TypeVar("F", bound=Callable[..., Any])


def fp32(x: Any) -> Any:
    """``x`` with every floating tensor below float32 (bf16, fp16) cast to float32; tensors inside
    lists, tuples and dicts too; float64, integer tensors and anything else unchanged."""
    if isinstance(x, Tensor):
        return x.float() if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64) else x
    if isinstance(x, (list, tuple)):
        return type(x)(fp32(v) for v in x)
    if isinstance(x, dict):
        return {k: fp32(v) for k, v in x.items()}
    return x


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):   # a device type this torch build does not know
        return False


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Disable autocast on every device type where it is on (a no-op where none is)."""
    with contextlib.ExitStack() as stack:
        for t in _DEVICE_TYPES:
            if _autocast_enabled(t):
                stack.enter_context(torch.autocast(t, enabled=False))
        yield


@contextlib.contextmanager
def fp32_loss(*tensors: Any) -> Iterator[tuple]:
    """``with fp32_loss(a, b) as (a, b):`` -- autocast off inside, the arguments upcast by :func:`fp32`."""
    with autocast_off():
        yield tuple(fp32(t) for t in tensors)


def float32_loss(fn: F) -> F:
    """Decorator: ``fn`` runs with autocast off and its tensor arguments upcast by :func:`fp32`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*fp32(args), **fp32(kwargs))
    return wrapper  # type: ignore[return-value]
