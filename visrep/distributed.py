"""torch.distributed in a few functions: the bottom layer, usable from losses, methods and the engine.

``init_distributed()`` reads torchrun's variables (without them: a single process). Collectives that
carry gradients take an explicit ``group`` and are the identity on one process: :func:`all_reduce`
(backward: sum of every process's gradient) and :func:`all_gather` (backward: this rank's slice of the
summed gradients). With DDP's gradient average, 2 processes x batch B give exactly the gradients of
1 process x batch 2B. Nothing reduces behind the caller's back.
Specification and notes: docs/distributed.md
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main() -> bool:
    return get_rank() == 0


def init_distributed(backend: str | None = None) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment; returns ``(rank, world, local_rank)``.

    Backend: nccl when CUDA is available, else gloo (or ``backend``). On CUDA the process's device
    is set to ``LOCAL_RANK``. Calling it again, or without the torchrun variables, is a no-op.
    """
    if is_distributed():
        return get_rank(), get_world_size(), get_local_rank()
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1 or "RANK" not in os.environ:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return rank, world, local_rank


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In place (and returned): the mean of ``tensor`` over ranks; identity in a single process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(get_world_size())
    return tensor


def all_gather_object(obj):
    """A list with every rank's ``obj`` (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# -- collectives that carry gradients -----------------------------------------------------------
def _world(group) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), x.shape[0]
        world = dist.get_world_size(group)
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device), group=group)
        ctx.sizes = [int(s) for s in sizes]
        if len(set(ctx.sizes)) != 1:
            raise ValueError(f"all_gather needs the same leading size on every process, got {ctx.sizes}")
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)  # gloo has no reduce_scatter
        start = sum(ctx.sizes[:ctx.rank])
        return grad[start:start + ctx.n], None


def all_reduce(x: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """Sum (``op="sum"``) or mean (``op="mean"``) of ``x`` over the processes of ``group``, with
    gradients (see the module docstring); ``op="max"`` carries no gradient (for numerical shifts).
    A new tensor. Identity on one process."""
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"all_reduce: op must be 'sum', 'mean' or 'max', got {op!r}")
    if _world(group) == 1:
        return x
    if op == "max":
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out
    out = _AllReduceSum.apply(x, group)
    return out / _world(group) if op == "mean" else out


def all_gather(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every process's ``x`` concatenated along dim 0 in rank order, with gradients (this rank's slice
    of the summed output gradients flows back). Identity on one process."""
    if _world(group) == 1:
        return x
    return _AllGather.apply(x, group)


def rank_in(group=None) -> int:
    """This process's rank within ``group`` (0 on one process)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_in(group=None) -> int:
    """The number of processes in ``group`` (1 on one process)."""
    return _world(group)


# -- FSDP2 parameters (DTensor shards) -----------------------------------------------------------
def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``DTensor`` (e.g. an FSDP2-sharded parameter, its gradient or optimizer state)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def is_fsdp_module(module) -> bool:
    """Whether ``module`` was sharded by FSDP2 ``fully_shard`` (its parameters are gathered by hooks
    around its ``forward``: code that calls its submodules directly must call the module instead)."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` gathered (a collective: every process must call it), else ``x``."""
    return x.full_tensor() if is_dtensor(x) else x


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


__all__ = [
    "all_gather",
    "all_gather_object",
    "all_reduce",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "cleanup",
    "full_tensor",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_dtensor",
    "is_fsdp_module",
    "is_main",
    "rank_in",
    "world_in",
]
