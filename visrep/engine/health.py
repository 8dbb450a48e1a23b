"""Is the objective doing anything? Collapse signals of a run, read at log steps only.

A method records, in ``training_step``, what its loss sees (``Method.record_health``): the
``embeddings`` it compares, the ``target_probs`` its prototype / self-distillation targets assign
(MSN, PMSN, PAWS, DINOv2) and the ``target_repr`` it regresses (JEPA family). At log steps the engine
turns them into scalars:

    rank            RankMe (Garrido et al. 2023): exp(entropy of the normalised singular values)
    emb_std         mean per-dimension std of the L2-normalised embeddings x sqrt(D) (1: spread, 0: collapsed)
    target_entropy  mean entropy of the targets / log K (1: uniform targets, no signal)
    mean_entropy    entropy of the batch-mean target / log K (low: few prototypes used)
    target_top      mean top probability of the targets
    proto_usage     fraction of prototypes that are some sample's argmax
    target_std      mean per-dimension std of the regressed representations

and :class:`HealthMonitor` warns once when a collapse signature persists (targets within 0.1 nats of
uniform, or an effective rank below 2, at three log steps in a row after the first tenth of the run).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

HEALTH_KEYS = ("rank", "emb_std", "target_entropy", "mean_entropy", "target_top", "proto_usage", "target_std")


def effective_rank(z: Tensor, eps: float = 1e-7) -> Tensor:
    """RankMe of ``[N, D]`` embeddings: ``exp(-sum p log p)`` with ``p = s / sum(s)``, ``s`` their singular
    values (between 1 and ``min(N, D)``).

    The singular values are the square roots of the eigenvalues of the smaller Gram matrix, in float64.
    ``torch.linalg.svdvals`` is not used: MKL's threaded ``sgesdd`` (its QR of a tall matrix) deadlocked
    here in a process whose torch thread count had changed between runs (pytest, 2 threads). The Gram
    route is also cheaper for N >> D. A non-finite entry gives NaN, with no error and no host sync."""
    z = z.to(torch.float32 if z.device.type == "mps" else torch.float64)  # (MPS has no float64)
    finite = torch.isfinite(z).all()
    z = torch.where(torch.isfinite(z), z, torch.zeros((), dtype=z.dtype, device=z.device))
    gram = z.mT @ z if z.shape[0] >= z.shape[1] else z @ z.mT
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    p = s / s.sum().clamp_min(eps) + eps
    return torch.where(finite, torch.exp(-(p * p.log()).sum()), torch.full((), math.nan, device=p.device)).float()


def embedding_std(z: Tensor) -> Tensor:
    """Mean per-dimension std of the L2-normalised rows, times sqrt(D): about 1 when spread over the
    sphere, 0 when every row is the same (SimSiam's collapse monitor, scaled)."""
    z = torch.nn.functional.normalize(z.float(), dim=-1)
    return z.std(0).mean() * math.sqrt(z.shape[-1])


def target_stats(p: Tensor, eps: float = 1e-12) -> dict[str, Tensor]:
    """Entropy of the targets ``[N, K]`` (rows sum to 1) and of their batch mean, relative to log K;
    the mean top probability; the fraction of the K prototypes that are some row's argmax."""
    p = p.float()
    k = p.shape[-1]
    log_k = math.log(k)
    ent = -(p * (p + eps).log()).sum(-1).mean()
    mean = p.mean(0)
    return {"target_entropy": ent / log_k, "mean_entropy": -(mean * (mean + eps).log()).sum() / log_k,
            "target_top": p.max(-1).values.mean(),
            "proto_usage": torch.zeros(k, device=p.device).index_fill_(0, p.argmax(-1), 1.0).mean()}


def health_stats(inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The scalars of :data:`HEALTH_KEYS` that ``inputs`` (a method's recorded tensors) allow."""
    out: dict[str, Tensor] = {}
    z = inputs.get("embeddings")
    if z is not None:
        z = z.reshape(-1, z.shape[-1])
        out["rank"], out["emb_std"] = effective_rank(z), embedding_std(z)
    p = inputs.get("target_probs")
    if p is not None:
        out.update(target_stats(p.reshape(-1, p.shape[-1])))
    h = inputs.get("target_repr")
    if h is not None:
        out["target_std"] = h.reshape(-1, h.shape[-1]).float().std(0).mean()
    return out


class HealthMonitor:
    """Tracks the health scalars over log steps; warns once per signal when a collapse signature
    persists (``patience`` log steps in a row, after ``warmup`` of the run's steps)."""

    REMEDIES = {
        "uniform_targets": "the targets carry no signal (entropy within 0.1 nats of uniform): lower the teacher / "
                           "target temperature or sharpen more, check the centring momentum, or train longer "
                           "before judging",
        "low_rank": "the embeddings span fewer than 2 dimensions: raise the regulariser that spreads them (ME-MAX, "
                    "KoLeo), lower the learning rate or the EMA momentum warm-up, check the predictor depth",
    }

    def __init__(self, total_steps: int, patience: int = 3, warmup: float = 0.1):
        self.total_steps, self.patience, self.warmup = total_steps, patience, warmup
        self.streak = {k: 0 for k in self.REMEDIES}
        self.warned: set[str] = set()
        self.last: dict[str, float] = {}

    def signatures(self, stats: dict[str, float], num_prototypes: int | None = None) -> set[str]:
        found = set()
        k = num_prototypes
        if "target_entropy" in stats and k and (1.0 - stats["target_entropy"]) * math.log(k) < 0.1:
            found.add("uniform_targets")
        if "rank" in stats and stats["rank"] < 2.0:
            found.add("low_rank")
        return found

    def update(self, step: int, stats: dict[str, float], num_prototypes: int | None = None) -> list[str]:
        """Record one log step's scalars; returns the warnings issued now (also sent to ``warnings``)."""
        self.last = dict(stats)
        if step < self.warmup * self.total_steps:
            return []
        found = self.signatures(stats, num_prototypes)
        issued = []
        for name in self.REMEDIES:
            self.streak[name] = self.streak[name] + 1 if name in found else 0
            if self.streak[name] >= self.patience and name not in self.warned:
                self.warned.add(name)
                shown = ", ".join(f"{k}={v:.3g}" for k, v in stats.items())
                msg = f"collapse signature at step {step} ({name}: {shown}); {self.REMEDIES[name]}"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                issued.append(msg)
        return issued

    def summary(self) -> str:
        if not self.last:
            return "health: nothing recorded"
        shown = ", ".join(f"{k} {v:.3g}" for k, v in self.last.items())
        flags = f"; warnings: {', '.join(sorted(self.warned))}" if self.warned else "; no collapse signature"
        return f"health at the last log step: {shown}{flags}"


__all__ = ["HEALTH_KEYS", "HealthMonitor", "effective_rank", "embedding_std", "health_stats", "target_stats"]
