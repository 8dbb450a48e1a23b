"""Memory-augmented ("critical gradient") optimizers: :class:`SGDC`, :class:`AdamC`, :class:`RMSpropC`.

McRae et al., "Memory Augmented Optimizers for Deep Learning", ICLR 2022; official code
chandar-lab/CriticalGradientOptimization @ 1af4b1d (``optimizers/optim.py``, ``prioritydict.py``).

    for every parameter with a gradient g (buffer B: the top C = topc past gradients by priority):
        q = sum of the group's gradient norms (synced=True) or ||g||
        g_hat = aggregate(g, B)                  # before inserting g; 'sum': g + kappa * mean(B)
        insert g if |B| < C or q beats the lowest priority; every stored priority *= decay
        base step (SGD with momentum / Adam / RMSprop) on g_hat + weight_decay * p

Default: the paper (exact top-C, ``kappa`` scales the memory, ``kappa = 0`` is exactly the base
optimizer, weight decay after aggregation, no host sync); ``reference_compat=True`` reproduces the
official code step for step, heap-array quirks included. The buffer lives in ``optimizer.state``.
Specification and notes: docs/optim/critical.md
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

AGGREGATIONS = ("sum", "mean", "mid", "min", "max", "median", "min-mean", "max-mean", "median-mean")
_EXACT_KEYS = ("cg_priorities", "cg_order")  # torch's load_state_dict would cast these to the param dtype


class _HeapItem:
    """A buffer entry as the reference's heap sees it: ordered by priority only."""

    __slots__ = ("priority", "slot")

    def __init__(self, priority: float, slot: int):
        self.priority, self.slot = priority, slot

    def __lt__(self, other: _HeapItem) -> bool:
        return self.priority < other.priority


class CriticalBuffer:
    """Top-C memory of past gradients of one parameter, kept as tensors in its optimizer ``state``.

    Slots ``0..n-1`` of ``cg_grads`` hold the ``n`` stored gradients. ``heap_order=False`` (paper) keeps the
    exact top C with tensor ops only (no host sync). ``heap_order=True`` (reference_compat) replays the
    reference's heap array on the host: ``cg_order[i]`` is the slot at array position ``i``.
    """

    def __init__(self, state: dict[str, Any], capacity: int, heap_order: bool):
        self.state = state
        self.capacity = state["cg_grads"].shape[0] if "cg_grads" in state else capacity
        self.heap_order = heap_order

    def __len__(self) -> int:
        return self.state.get("cg_size", 0)

    def _positions(self) -> Tensor:
        return self.state["cg_order"][: len(self)]

    def priorities(self) -> Tensor:
        """Stored priorities in (heap-)array order, ``[n]`` float64."""
        if not len(self):
            return torch.empty(0, dtype=torch.float64)
        return self.state["cg_priorities"][self._positions()]

    def grads(self) -> Tensor:
        """Stored gradients in (heap-)array order, ``[n, *shape]``."""
        if not len(self):
            return torch.empty(0)
        return self.state["cg_grads"][self._positions().to(self.state["cg_grads"].device)]

    def aggregate(self, grad: Tensor, aggr: str, kappa: float) -> Tensor:
        """``g_hat`` for the current gradient ``grad`` (see the module table); the buffer must not be empty."""
        n = len(self)
        if aggr in ("sum", "mean", "mid"):
            total = self.state["cg_grads"][:n].sum(0)
            if aggr == "mean":
                return grad.add(total, alpha=kappa).div_(n + 1)
            out = grad.add(total, alpha=kappa / n)
            return out.mul_(0.5) if aggr == "mid" else out
        kind, _, half = aggr.partition("-")
        chosen = self._select(kind)
        if self.heap_order:  # the reference scales the stored gradient itself
            out = grad + chosen.mul_(kappa)
        else:
            out = grad.add(chosen, alpha=kappa)
        return out.mul_(0.5) if half else out

    def _select(self, kind: str) -> Tensor:
        """The stored gradient of lowest / highest / median priority (heap mode: a view, by array position)."""
        prio = self.priorities()
        if kind == "min":
            pos = 0 if self.heap_order else prio.argmin()
        elif kind == "max":
            pos = prio.argmax()  # first maximum in array order, as the reference's linear scan
        else:
            pos = prio.sort(stable=True).indices[len(self) // 2]
        grads = self.state["cg_grads"]
        if self.heap_order:
            return grads[int(self._positions()[pos])]
        return grads.index_select(0, pos.view(1))[0]  # exact mode: position == slot; no host sync

    def insert(self, grad: Tensor, priority: Tensor | float, critical_test: bool) -> None:
        """Offer ``grad`` with ``priority`` (a python float in heap mode, a 0-d tensor otherwise)."""
        if "cg_grads" not in self.state:
            index_device = torch.device("cpu") if self.heap_order else grad.device
            self.state["cg_grads"] = grad.new_zeros((self.capacity, *grad.shape))
            self.state["cg_priorities"] = torch.zeros(self.capacity, dtype=torch.float64, device=index_device)
            self.state["cg_order"] = torch.arange(self.capacity, device=index_device)
            self.state["cg_size"] = 0
        if self.heap_order:
            self._insert_heap(grad, float(priority), critical_test)
            return
        n, grads, prio = len(self), self.state["cg_grads"], self.state["cg_priorities"]
        priority = priority.to(prio)
        if n < self.capacity:
            grads[n].copy_(grad)
            prio[n] = priority
            self.state["cg_size"] = n + 1
            return
        idx = prio.argmin().view(1)  # replace the true minimum if the new priority is larger
        old = prio.index_select(0, idx)
        admit = priority > old
        mask = admit.view(1, *([1] * grad.dim()))
        grads.index_copy_(0, idx, torch.where(mask, grad.unsqueeze(0), grads.index_select(0, idx)))
        prio.index_copy_(0, idx, torch.where(admit, priority.view(1), old))

    def _insert_heap(self, grad: Tensor, priority: float, critical_test: bool) -> None:
        n, prio, order = len(self), self.state["cg_priorities"], self.state["cg_order"]
        items = [_HeapItem(q, s) for q, s in zip(prio[order[:n]].tolist(), order[:n].tolist())]
        if n == self.capacity and critical_test and not priority > items[0].priority:
            return
        new = _HeapItem(priority, n)
        items.append(new)
        heapq.heapify(items)
        dropped = items.pop(0) if len(items) > self.capacity else None
        if dropped is not new:
            if dropped is not None:
                new.slot = dropped.slot
            self.state["cg_grads"][new.slot].copy_(grad)
            prio[new.slot] = priority
        order[: len(items)] = torch.tensor([it.slot for it in items], dtype=order.dtype)
        self.state["cg_size"] = len(items)

    @staticmethod
    def decay_(buffers: list[CriticalBuffer], factor: float) -> None:
        """Multiply every stored priority of ``buffers`` by ``factor``."""
        prios = [b.state["cg_priorities"] for b in buffers if "cg_priorities" in b.state]
        if prios:
            torch._foreach_mul_(prios, factor)


class _CriticalOptimizer(Optimizer):
    """Shared step of the three optimizers: memory (priorities, aggregate, insert, decay), weight decay,
    then the subclass's base rule ``_update(group, params, grads)``."""

    # Reference behaviours reproduced under reference_compat=True (see the module table).
    _REF_WD_BEFORE_MEMORY = False
    _REF_KAPPA_IS_SWITCH = True
    _REF_ALWAYS_TEST = False

    def __init__(self, params: Iterable, defaults: dict[str, Any], *, topc: int, decay: float, kappa: float,
                 aggr: str, critical_test: bool, synced: bool, reference_compat: bool):
        if defaults["lr"] < 0:
            raise ValueError(f"invalid lr {defaults['lr']}")
        if defaults["weight_decay"] < 0:
            raise ValueError(f"invalid weight_decay {defaults['weight_decay']}")
        if int(topc) != topc or topc < 1:
            raise ValueError(f"topc must be a positive integer, got {topc}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if kappa < 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        if aggr not in AGGREGATIONS:
            raise ValueError(f"aggr must be one of {AGGREGATIONS}, got {aggr!r}")
        defaults.update(topc=int(topc), decay=decay, kappa=kappa, aggr=aggr, critical_test=critical_test,
                        synced=synced, reference_compat=reference_compat)
        super().__init__(params, defaults)

    def memory(self, p: Tensor, group: dict[str, Any]) -> CriticalBuffer:
        """The critical-gradient buffer of parameter ``p`` (in ``group``)."""
        return CriticalBuffer(self.state[p], group["topc"], group["reference_compat"])

    def aggregate(self, p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        """``g_hat`` of ``p`` for the current gradient ``grad``, from its (non-empty) buffer before insertion."""
        compat_switch = group["reference_compat"] and self._REF_KAPPA_IS_SWITCH
        return self.memory(p, group).aggregate(grad, group["aggr"], 1.0 if compat_switch else group["kappa"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            raw = [p.grad for p in params]
            if any(g.is_sparse for g in raw):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grads, wd = raw, group["weight_decay"]
            if wd and group["reference_compat"] and self._REF_WD_BEFORE_MEMORY:
                grads, wd = torch._foreach_add(raw, params, alpha=wd), 0.0
            if group["kappa"] != 0:
                grads = self._remember(group, params, raw, grads)
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            self._update(group, params, grads)
        return loss

    def _remember(self, group: dict[str, Any], params: list[Tensor], raw: list[Tensor],
                  grads: list[Tensor]) -> list[Tensor]:
        """Aggregate each gradient with its buffer, insert it (priority from the raw gradients), decay."""
        norms = [n.to(torch.float64) for n in torch._foreach_norm(raw)]
        if group["synced"]:
            device = norms[0].device
            total = torch.stack([n.to(device) for n in norms]).sum()
            priorities: list[Any] = [total] * len(params)
        else:
            priorities = norms
        compat = group["reference_compat"]
        if compat:  # the heap is replayed on the host: one sync per group
            priorities = torch.stack([q.cpu() for q in priorities]).tolist()
        test = group["critical_test"] or (compat and self._REF_ALWAYS_TEST)
        out, buffers = [], []
        for p, g, q in zip(params, grads, priorities):
            buf = self.memory(p, group)
            out.append(self.aggregate(p, g, group) if len(buf) else g)
            buf.insert(g, q, test)
            buffers.append(buf)
        CriticalBuffer.decay_(buffers, group["decay"])
        return out

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch, but the buffer's float64 priorities and int64 order keep their dtype (torch would cast
        every floating state tensor to the parameter's dtype) and their device (host in compat mode)."""
        super().load_state_dict(state_dict)
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(group["params"], saved_group["params"]):
                saved = state_dict["state"].get(pid, {})
                device = torch.device("cpu") if group["reference_compat"] else p.device
                for key in _EXACT_KEYS:
                    if key in saved:
                        self.state[p][key] = saved[key].to(device, copy=True)


class SGDC(_CriticalOptimizer):
    """SGD (optionally momentum / Nesterov, torch semantics) on the memory-augmented gradient.

    ``buf <- momentum * buf + (1 - dampening) * d`` (``buf = d`` on the first step), ``p <- p - lr * buf``
    (Nesterov: ``p <- p - lr * (d + momentum * buf)``), with ``d = g_hat + weight_decay * p``.
    Default ``aggr='sum'``. reference_compat: weight decay is folded into the gradient before it is stored
    and aggregated, and ``kappa = 0`` also switches momentum off (see the module table).
    """

    _REF_WD_BEFORE_MEMORY = True
    _REF_KAPPA_IS_SWITCH = False

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, topc: int = 10, decay: float = 0.7,
                 kappa: float = 1.0, aggr: str = "sum", critical_test: bool = True, synced: bool = True,
                 reference_compat: bool = False):
        if momentum < 0:
            raise ValueError(f"invalid momentum {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, topc=topc, decay=decay, kappa=kappa, aggr=aggr,
                         critical_test=critical_test, synced=synced, reference_compat=reference_compat)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        momentum = group["momentum"]
        if momentum != 0 and not (group["reference_compat"] and group["kappa"] == 0):
            bufs = []
            for p, d in zip(params, grads):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.detach().clone()
                else:
                    buf.mul_(momentum).add_(d, alpha=1 - group["dampening"])
                bufs.append(buf)
            grads = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])


class AdamC(_CriticalOptimizer):
    """Adam (L2 weight decay, optional AMSGrad, torch semantics) on the memory-augmented gradient.

    ``m <- b1 m + (1-b1) d``, ``v <- b2 v + (1-b2) d^2`` (AMSGrad: ``v_max <- max(v_max, v)``),
    ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, with ``d = g_hat + weight_decay * p``.
    Default ``aggr='mean'``. reference_compat: ``kappa`` only switches the memory on (the aggregate uses 1).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, topc: int = 10,
                 decay: float = 0.7, kappa: float = 1.0, aggr: str = "mean", critical_test: bool = True,
                 synced: bool = True, reference_compat: bool = False):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)
        super().__init__(params, defaults, topc=topc, decay=decay, kappa=kappa, aggr=aggr,
                         critical_test=critical_test, synced=synced, reference_compat=reference_compat)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        second = exp_avg_sqs
        if group["amsgrad"]:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sqs)
        denom = torch._foreach_sqrt(second)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** s["step"]) for s in states])
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-group["lr"] / (1 - beta1 ** s["step"]) for s in states])


class RMSpropC(_CriticalOptimizer):
    """RMSprop (optionally centered / momentum, torch semantics) on the memory-augmented gradient.

    ``v <- alpha v + (1-alpha) d^2``; centered: ``a <- alpha a + (1-alpha) d``, ``avg = sqrt(v - a^2) + eps``,
    else ``avg = sqrt(v) + eps``; momentum: ``buf <- momentum buf + d / avg``, ``p <- p - lr buf``; otherwise
    ``p <- p - lr d / avg``; ``d = g_hat + weight_decay * p``. Default ``aggr='mean'``.
    reference_compat: ``kappa`` only switches the memory on and ``critical_test`` is ignored (always on).
    """

    _REF_ALWAYS_TEST = True

    def __init__(self, params: Iterable, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *, topc: int = 10,
                 decay: float = 0.7, kappa: float = 1.0, aggr: str = "mean", critical_test: bool = True,
                 synced: bool = True, reference_compat: bool = False):
        if alpha < 0 or eps < 0 or momentum < 0:
            raise ValueError(f"invalid alpha / eps / momentum: {alpha}, {eps}, {momentum}")
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered)
        super().__init__(params, defaults, topc=topc, decay=decay, kappa=kappa, aggr=aggr,
                         critical_test=critical_test, synced=synced, reference_compat=reference_compat)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        alpha, momentum = group["alpha"], group["momentum"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                state["step"] = 0
                state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["centered"] and "grad_avg" not in state:
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if momentum > 0 and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
        square_avgs = [s["square_avg"] for s in states]
        torch._foreach_mul_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
        if group["centered"]:
            grad_avgs = [s["grad_avg"] for s in states]
            torch._foreach_mul_(grad_avgs, alpha)
            torch._foreach_add_(grad_avgs, grads, alpha=1 - alpha)
            avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(avg, group["eps"])
        if momentum > 0:
            bufs = [s["momentum_buffer"] for s in states]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcdiv_(bufs, grads, avg)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        else:
            torch._foreach_addcdiv_(params, grads, avg, value=-group["lr"])


SGD_C = SGDC
Adam_C = AdamC
RMSprop_C = RMSpropC

__all__ = ["AGGREGATIONS", "AdamC", "Adam_C", "CriticalBuffer", "RMSpropC", "RMSprop_C", "SGDC", "SGD_C"]
