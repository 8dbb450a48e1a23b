"""Supervised fine-tuning protocols: a trainable network + a classification head on labelled images.

``AttentivePooler`` is the attentive probe of V-JEPA / IWM: one learned query cross-attends to a token
sequence (SDPA), then a residual MLP, LayerNorm and a linear classifier. ``train_classifier`` trains
any ``nn.Module`` that maps a batch of inputs to logits with AdamW (per-group learning rates, linear
warm-up then cosine, label smoothing) and reports top-1 on the test split; the inputs may be images
or pre-computed frozen features (the IWM predictor protocol pre-computes the frozen encoder's tokens
once, so only the trainable part runs every epoch).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


class AttentivePooler(nn.Module):
    """``[B, N, D]`` tokens -> ``[B, num_classes]`` logits through one learned query."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentivePooler: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_kv = nn.LayerNorm(dim)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        b, n, d = tokens.shape
        h = self.num_heads
        k, v = self.kv(self.norm_kv(tokens)).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        q = self.q(self.query).view(1, h, 1, d // h).expand(b, -1, -1, -1)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, d)
        x = self.query + self.proj(x)
        x = x + self.mlp(self.norm_mlp(x))
        return self.head(self.norm(x[:, 0]))


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_classifier(model: nn.Module, groups: list[dict], train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                     epochs: int = 10, batch_size: int = 128, weight_decay: float = 0.05, label_smoothing: float = 0.0,
                     warmup_fraction: float = 0.1, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu", desc: str = "fine-tune", eval_mode: bool = False) -> dict:
    """Train ``model`` (inputs -> logits) on ``train = (x, y)``; returns ``{"top1", "seconds", "steps"}``
    measured on ``test``. ``groups``: AdamW parameter groups, each with its own ``lr``. With
    ``eval_mode`` the model stays in eval mode while training (no dropout or stochastic noise)."""
    x_tr, y_tr = train
    if len(x_tr) == 0:
        raise ValueError(f"{desc}: no training samples")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    steps_per_epoch = max(1, len(x_tr) // batch_size)
    total = epochs * steps_per_epoch
    for group in groups:
        group.setdefault("weight_decay", weight_decay)
        group["base_lr"] = group["lr"]
    opt = torch.optim.AdamW(groups)
    model.to(device).train(not eval_mode)
    start, step = time.perf_counter(), 0
    bar = tqdm(total=total, desc=desc, leave=False, mininterval=2.0)
    for _ in range(epochs):
        order = torch.randperm(len(x_tr), generator=g)
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            scale = _cosine(step, total, int(warmup_fraction * total))
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
            logits = model(x_tr[idx].to(device, non_blocking=True))
            loss = F.cross_entropy(logits, y_tr[idx].to(device), label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
    bar.close()
    return {"top1": 100.0 * accuracy(model, test, batch_size=4 * batch_size, device=device),
            "seconds": time.perf_counter() - start, "steps": step}


def finetune_encoder(network: nn.Module, vit: nn.Module, feature_dim: int, num_classes: int,
                     train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], epochs: int = 10, lr: float = 1e-3,
                     layer_decay: float = 0.75, weight_decay: float = 0.05, label_smoothing: float = 0.1,
                     batch_size: int = 128, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu", desc: str = "fine-tune") -> dict:
    """End-to-end fine-tuning (BEiT / MAE protocol): ``network`` (images -> ``[B, feature_dim]``
    features, ``vit`` its transformer) plus a linear head, AdamW with layer-wise lr decay
    (``layer_decay ** (depth + 1 - layer)``), warm-up + cosine, label smoothing. No augmentation
    beyond what ``network`` does itself. Returns :func:`train_classifier`'s dict."""
    from visrep.optim.groups import layer_decay_groups

    head = nn.Linear(feature_dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE's head init
    nn.init.zeros_(head.bias)
    groups = layer_decay_groups(vit, layer_decay, head=head, lr=lr)
    for g in groups:
        g.pop("lr_scale"), g.pop("wd_exclude", None)
    return train_classifier(nn.Sequential(network, head), groups, train, test, epochs=epochs, batch_size=batch_size,
                            weight_decay=weight_decay, label_smoothing=label_smoothing, generator=generator,
                            device=device, desc=desc)


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor], batch_size: int = 512, device="cpu") -> float:
    x, y = data
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb.to(device)).argmax(-1).cpu() == yb).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True))
    model.train(was_training)
    return correct / max(1, len(x))


__all__ = ["AttentivePooler", "accuracy", "finetune_encoder", "train_classifier"]
