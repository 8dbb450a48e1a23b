"""Supervised ViT classification at any patch size (PiT's first case study: pixels as tokens).

Nguyen et al., "An Image is Worth More Than 16x16 Patches: Exploring Transformers on Individual
Pixels" (arXiv 2406.09415). No official code; the recipe is the usual DeiT/timm one:

    x = RandomResizedCrop + flip (+ RandAugment); x, t = mixup / cutmix (x, y), label smoothing
    loss = cross_entropy(head(pool(ViT(x))), t)                  # patch_size 1: each pixel a token
    step AdamW (warm-up + cosine lr, weight decay except biases, norms, tokens, positions)

Pixel tokens: ``model.patch_size=1``, ``model.pos_embed=learned``; ``model.pixel_permutation`` is the
locality control. RandAugment per group of ``randaugment_group`` images (torchvision), Mixup / CutMix
timm's; every draw from the step's generator.
Specification and notes: docs/methods/supervised.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.data.crops import CropSpec, take_crops
from visrep.errors import ConfigError
from visrep.formats import declare
from visrep.models import vit_from_config
from visrep.optim.groups import decay_groups

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata


@dataclass
class SupervisedConfig:
    name: Literal["supervised"] = "supervised"
    pool: Literal["avg", "cls"] = "avg"          # "cls" needs model.class_token=true
    label_smoothing: float = 0.1
    mixup: float = 0.0                            # Beta(alpha, alpha) mixing; 0: off (DeiT: 0.8)
    cutmix: float = 0.0                           # 0: off (DeiT: 1.0)
    mix_prob: float = 1.0                         # probability a batch is mixed at all
    switch_prob: float = 0.5                      # cutmix instead of mixup when both are on
    randaugment: int = 0                          # number of ops (DeiT: 2); 0: off
    randaugment_magnitude: int = 9
    randaugment_group: int = 16                   # images sharing one draw of ops
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    head_init_std: float = 0.02


class Supervised(Method):
    feature_description = "supervised ViT: pooled final-normed tokens (avg of patch tokens, or [CLS])"

    @classmethod
    def validate(cls, cfg) -> None:
        m = cfg.method
        check_vit_config(cfg, class_token="method.pool=cls pools the [CLS] token" if m.pool == "cls" else None)
        if not 0 <= m.label_smoothing < 1:
            raise ConfigError(f"method.label_smoothing={m.label_smoothing} must be in [0, 1)")
        if (m.mixup or m.cutmix) and cfg.train.batch_size % 2:
            raise ConfigError(f"mixup/cutmix pair images within the batch: train.batch_size="
                              f"{cfg.train.batch_size} must be even")
        if m.randaugment_group < 1:
            raise ConfigError("method.randaugment_group must be >= 1")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        if not self.data_info.num_classes:
            raise ValueError("supervised training needs labels: the dataset reports no classes")
        m = self.cfg
        self.num_classes = self.data_info.num_classes
        self.encoder = vit_from_config(cfg.model, self.data_info.in_chans, self.image_size)
        self.head = nn.Linear(self.encoder.embed_dim, self.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=m.head_init_std)
        nn.init.zeros_(self.head.bias)
        self.mixer = None
        if m.mixup or m.cutmix:
            from timm.data import Mixup

            self.mixer = Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, prob=m.mix_prob,
                               switch_prob=m.switch_prob, mode="batch", label_smoothing=m.label_smoothing,
                               num_classes=self.num_classes)

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """One RandomResizedCrop (+ flip) of the full image, as timm's / DeiT's train transform."""
        m = self.cfg
        return {"main": StreamSpec(crops={"image": CropSpec(self.image_size, 1, tuple(m.crop_scale), hflip=m.hflip)})}

    def randaugment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """torchvision RandAugment on uint8 images, one draw per group of images (seeded from ``generator``)."""
        from torchvision.transforms import v2

        m = self.cfg
        op = v2.RandAugment(num_ops=m.randaugment, magnitude=m.randaugment_magnitude)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.cat([op(chunk) for chunk in images.split(m.randaugment_group)])

    def soft_targets(self, labels: Tensor) -> Tensor:
        s, k = self.cfg.label_smoothing, self.num_classes
        return F.one_hot(labels, k).double() * (1 - s) + s / k  # cast to the logits' dtype by training_step

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        m, labels = self.cfg, batch["label"]
        if (labels < 0).any():
            raise ValueError("supervised training got images without labels (label -1)")
        images = take_crops(batch, self.streams()["main"].crops, generator, as_float=False)["image"][:, 0]
        if m.randaugment:  # on the crop, as timm's transform (both data paths)
            if images.dtype != torch.uint8:
                images = (images * 255).round().to(torch.uint8)
            images = self.randaugment(images, generator)
        images = self.normalize(images)
        if self.mixer is not None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
            state = np.random.get_state()  # timm's Mixup draws from numpy's global RNG
            np.random.seed(seed)
            try:
                images, targets = self.mixer(images.clone(), labels)
            finally:
                np.random.set_state(state)
        else:
            targets = self.soft_targets(labels)
        return {**batch, "image": images, "target": targets}

    # -- training --------------------------------------------------------------------------------
    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.pooled(images))

    def pooled(self, images: Tensor) -> Tensor:
        """Pooled final-normed tokens of normalised ``images``."""
        return self.encoder.pooled(images, pool=self.cfg.pool)

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        device = self.normalize.mean.device
        images = batch["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        targets = batch["target"].to(device, non_blocking=True)
        logits = self.logits(images)
        self.record_health(embeddings=logits)
        logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # float32 at least
        loss = torch.sum(-targets.to(logp.dtype) * logp, dim=-1).mean()
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets.argmax(-1)).float().mean()
        return {"loss": loss, "train_top1": acc}

    def param_groups(self) -> list[dict]:
        return decay_groups(self.encoder, self.head)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.pooled(self.normalize(images))

    def export_modules(self) -> dict[str, Export]:
        enc = self.eval_module()
        return {"encoder": Export(enc, {**module_metadata(enc), **declare(timm="vit")})}

    @torch.no_grad()
    def classify(self, images: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of raw uint8 (or [0, 1] float) images."""
        return self.logits(self.normalize(images))
