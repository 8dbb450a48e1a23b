"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for models that do not fit DDP (``train.parallel=fsdp``).

Each module of ``method.fsdp_units()`` (default: every trained transformer block) is a unit, the method
is the root unit; parameters the optimizer does not update (EMA targets, frozen teachers) stay
replicated. EMA teachers gather the student one parameter at a time. :func:`full_state` writes DDP's
checkpoint format (resume under either), :func:`load_full_state` / :func:`load_full_optimizer_state`
cut whole tensors into shards. Combines with ``model.grad_checkpointing``; on one process it is the
plain path.
Specification and notes: docs/engine/fsdp.md
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from visrep import distributed as D


def trained_parameters(param_groups: Iterable[dict]) -> set[int]:
    """The ``id`` of every parameter of the optimizer groups."""
    return {id(p) for g in param_groups for p in g["params"]}


def shard_method(method: nn.Module, device: torch.device, world: int) -> list[nn.Module]:
    """Shard ``method`` in place with FSDP2 over all ``world`` processes; returns the units (in the
    order they were sharded, the method last)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trained = trained_parameters(method.param_groups())
    ignored = {p for p in method.parameters() if id(p) not in trained}
    depth = {id(m): name.count(".") + 1 for name, m in method.named_modules() if name}
    units = []
    for unit in method.fsdp_units():
        if id(unit) not in depth:
            raise ValueError(f"{type(method).__name__}.fsdp_units(): a {type(unit).__name__} that is not a "
                             "submodule of the method")
        if not any(id(p) in trained for p in unit.parameters()):
            raise ValueError(f"{type(method).__name__}.fsdp_units(): a {type(unit).__name__} without trained "
                             "parameters (frozen modules stay replicated; leave them out)")
        if any(unit is u for u in units):
            continue
        units.append(unit)
    units.sort(key=lambda m: -depth[id(m)])  # nested units before the units that contain them
    mesh = init_device_mesh(device.type, (world,))
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    fully_shard(method, mesh=mesh, ignored_params=ignored)
    return [*units, method]


@contextlib.contextmanager
def unsharded_root(method: nn.Module) -> Iterator[None]:
    """The root unit's parameters gathered for calls that bypass ``forward`` (``method.features`` in
    the online k-NN); the block units gather themselves. Every process must enter it together."""
    method.unshard()
    try:
        yield
    finally:
        method.reshard()


def full_state(state: Any, keep: bool) -> Any:
    """``state`` (a state dict, nested dicts / lists) with every ``DTensor`` gathered to a whole CPU
    tensor, in the same order on every process (the gathers are collectives). ``keep=False`` (processes
    that do not write): gather and drop, return None."""
    def walk(x: Any) -> Any:
        if isinstance(x, Tensor):
            x = D.full_tensor(x.detach())
            return x.cpu() if keep else None
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x

    out = walk(state)
    return out if keep else None


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (a whole tensor) as a ``DTensor`` laid out as ``like``, cut locally on every process;
    ``full`` unchanged when ``like`` is a plain tensor."""
    if not D.is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"shape {tuple(full.shape)} does not match the sharded tensor's {tuple(like.shape)}")
    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def load_full_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a whole (DDP-format) state dict into a module whose parameters may be FSDP2 shards."""
    current = module.state_dict()
    module.load_state_dict({k: shard_like(v, current[k]) if k in current else v for k, v in state.items()})


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole (DDP-format, keyed by parameter index) optimizer state dict into an optimizer over
    FSDP2-sharded parameters: every state tensor of a parameter's shape is cut like the parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param = {}
    for index, entry in state["state"].items():
        p = params[index]
        per_param[index] = {k: shard_like(v, p) if isinstance(v, Tensor) and v.shape == p.shape else v
                            for k, v in entry.items()}
    optimizer.load_state_dict({**state, "state": per_param})


__all__ = ["full_state", "load_full_optimizer_state", "load_full_state", "shard_like", "shard_method",
           "trained_parameters", "unsharded_root"]
