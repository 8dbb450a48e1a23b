"""A method written only against the Method contract, registered by the tests (``register_toy``).

An MLP classifier with what real methods have: per-step noise from the step generator, an EMA
target, a batch-statistic term through ``visrep.distributed.all_reduce`` (so 2 processes must
equal 1), a head with its own lr / wd scale and a frozen-at-start group, a before-step hook, and an
evaluation protocol of its own (``agreement``), which the runner and the CLI find through the contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep import distributed as D
from visrep.eval.protocols import Protocol
from visrep.methods import METHODS, DataInfo, Method, MethodEntry, Step, StreamSpec
from visrep.methods.base import Export, module_metadata
from visrep.models import Normalize
from visrep.optim import decay_groups, ema_update_, make_target


@dataclass
class ToyConfig:
    name: Literal["toy"] = "toy"
    hidden: int = 16
    center_weight: float = 0.1
    freeze_head_steps: int = 1
    supports_per_class: int = 0        # > 0: a class-balanced "supports" stream (as PAWS)
    agreement_samples: int = 32        # protocol "agreement": test images it reads


class Encoder(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.arch = dict(in_features=in_features, hidden=hidden)
        self.embed_dim = 8
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ToyMethod(Method):
    feature_description = "toy MLP features"

    @classmethod
    def validate(cls, cfg) -> None:
        from visrep.errors import ConfigError

        if cfg.method.hidden < 1:
            raise ConfigError(f"method.hidden={cfg.method.hidden} must be >= 1")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        self.cfg = cfg.method
        info = self.data_info
        self.normalize = Normalize(info.mean, info.std)
        self.encoder = Encoder(info.in_chans * info.image_size ** 2, cfg.method.hidden)
        self.target = make_target(self.encoder)
        self.head = nn.Linear(8, info.num_classes or 4)
        self.before_calls = 0

    def streams(self) -> dict[str, StreamSpec]:
        streams = {"main": StreamSpec()}
        if self.cfg.supports_per_class:
            streams["supports"] = StreamSpec(sampler="class_balanced", per_class=self.cfg.supports_per_class,
                                             labels_per_class=4)
        return streams

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        x = self.normalize(batch["image"])
        noise = torch.randn(x.shape, generator=generator).to(x)
        out = {**batch, "image": x + 0.05 * noise}
        if "supports" in batch:
            out["supports"] = {**batch["supports"], "image": self.normalize(batch["supports"]["image"])}
        return out

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        z = self.encoder(batch["image"])
        ce = F.cross_entropy(self.head(z), batch["label"])
        n = D.all_reduce(torch.tensor(float(z.shape[0]), dtype=z.dtype, device=z.device))
        center = D.all_reduce(z.sum(0)) / n                      # a batch statistic over every process
        reg = self.cfg.center_weight * center.pow(2).sum()
        with torch.no_grad():
            agree = F.cosine_similarity(self.target(batch["image"]), z.detach()).mean()
        out = {"loss": ce + reg, "loss_ce": ce, "loss_center": reg, "target_agreement": agree}
        if "supports" in batch:  # every process draws its own supports; the term is a local mean
            s = batch["supports"]
            out["loss_supports"] = F.cross_entropy(self.head(self.encoder(s["image"])), s["label"])
            out["loss"] = out["loss"] + out["loss_supports"]
        return out

    def param_groups(self) -> list[dict]:
        return decay_groups(self.encoder) + [
            {"params": list(self.head.parameters()), "lr_scale": 0.5, "wd_scale": 0.5,
             "freeze_until": self.cfg.freeze_head_steps}]

    def before_optimizer_step(self, step: Step) -> None:
        self.before_calls += 1

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        ema_update_(self.target, self.encoder, 0.9)

    def eval_module(self) -> nn.Module:
        return self.target

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.target(self.normalize(images))

    def export_modules(self) -> dict[str, Export]:
        return {"target": Export(self.target, module_metadata(self.target))}

    # -- an evaluation of its own: declared here, run by ``visrep eval --protocols agreement`` -------
    @classmethod
    def protocols(cls) -> dict[str, Protocol]:
        return {"agreement": Protocol("mean cosine of the EMA target and the online encoder on test images",
                                      cls.agreement)}

    @torch.no_grad()
    def agreement(self, ctx) -> float:
        images = ctx.split("test")[1][:self.cfg.agreement_samples].to(ctx.device)
        x = self.normalize(images)
        return F.cosine_similarity(self.target(x), self.encoder(x)).mean().item()


def register_toy() -> None:
    """Register the toy as ``method.name=toy`` and make its encoder rebuildable by the hub."""
    from visrep.hub import REBUILDABLE

    METHODS["toy"] = MethodEntry("toy_method", "ToyConfig", "ToyMethod")
    REBUILDABLE["Encoder"] = Encoder
