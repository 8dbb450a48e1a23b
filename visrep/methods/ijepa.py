"""I-JEPA: predict the representations of several target blocks from one context block.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023; official code facebookresearch/ijepa @ 52c1ae9 (src/train.py).

    for each batch of images x:
        masks_enc, masks_pred = multiblock(x)                   # 1 context, 4 target blocks
        with no_grad:
            h = LN(target_encoder(x))                           # full image, non-affine LN
            h = h[masks_pred], repeated once per context mask
        z = predictor(encoder(x[masks_enc]), masks_enc, masks_pred)
        loss = smooth_l1(z, h)                                  # paper: L2 -> method.loss=l2
        step AdamW (cosine lr, cosine wd, no wd on biases/norms)
        target_encoder <- m * target_encoder + (1 - m) * encoder   (m: linear 0.996 -> 1)

Follows the released code where it differs from the paper: smooth-L1 loss (``loss=l2`` for the
paper's), no augmentation but RandomResizedCrop(0.3, 1), per-batch block sizes. The collator's
``mask_mode=official`` reproduces the reference masks (which may overlap / may hang on small grids);
the default never overlaps and always terminates. Probe features (``features``) are the paper's:
average-pooled last-layer tokens of the target encoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from visrep.data.masks import MultiBlockMaskCollator
from visrep.data.transforms import batch_random_resized_crop
from visrep.losses import jepa_loss, normalized_targets
from visrep.models import Predictor, VisionTransformer, apply_masks, repeat_interleave_batch
from visrep.optim.ema import ema_update_, make_target
from visrep.optim.schedules import linear_momentum

from .base import Method, Step, decay_groups


@dataclass
class IJEPAConfig:
    name: Literal["ijepa"] = "ijepa"
    pred_depth: int = 6
    pred_emb_dim: int = 384
    pred_num_heads: Optional[int] = None       # None: the encoder's head count (official)
    ema: tuple[float, float] = (0.996, 1.0)
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False
    mask_mode: Literal["default", "official"] = "default"
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: bool = False


def ijepa_loss(encoder, target_encoder, predictor, imgs: Tensor, masks_enc: list[Tensor],
               masks_pred: list[Tensor], kind: str = "smooth_l1") -> tuple[Tensor, Tensor, Tensor]:
    """The I-JEPA objective for one batch: returns (loss, predictions z, targets h)."""
    with torch.no_grad():
        h = normalized_targets(target_encoder(imgs))
        h = repeat_interleave_batch(apply_masks(h, masks_pred), imgs.size(0), repeat=len(masks_enc))
    z = predictor(encoder(imgs, idx_keep=masks_enc), masks_enc, masks_pred)
    return jepa_loss(z, h, kind), z, h


def _check_config(cfg) -> None:
    from visrep.config import ConfigError

    mc, m = cfg.model, cfg.method
    if mc.class_token or mc.num_registers:
        raise ConfigError("I-JEPA predicts patch tokens only: model.class_token must be false and "
                          "model.num_registers 0")
    for key, dim, heads in (("model.embed_dim", mc.embed_dim, mc.num_heads),
                            ("method.pred_emb_dim", m.pred_emb_dim, m.pred_num_heads or mc.num_heads)):
        if dim % heads:
            raise ConfigError(f"{key}={dim} must be divisible by the number of heads ({heads})")
        if mc.pos_embed == "sincos" and dim % 4:
            raise ConfigError(f"{key}={dim} must be divisible by 4 for sin-cos position embeddings")
    if cfg.data.image_size % mc.patch_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} must be a multiple of model.patch_size={mc.patch_size}")
    if cfg.optim.ipe_scale < 1:
        raise ConfigError(f"optim.ipe_scale={cfg.optim.ipe_scale} must be >= 1 (the EMA momentum would pass 1)")


class IJEPA(Method):
    feature_description = "I-JEPA probe features: average-pooled last-layer tokens of the target encoder"

    def __init__(self, cfg, data_info: dict):
        super().__init__()
        m, mc = cfg.method, cfg.model
        _check_config(cfg)
        self.cfg = m
        self.image_size = cfg.data.image_size
        self.encoder = VisionTransformer(
            img_size=self.image_size, patch_size=mc.patch_size, in_chans=data_info["in_chans"],
            embed_dim=mc.embed_dim, depth=mc.depth, num_heads=mc.num_heads, mlp_ratio=mc.mlp_ratio,
            qkv_bias=mc.qkv_bias, pos_embed=mc.pos_embed, class_token=mc.class_token,
            num_registers=mc.num_registers, drop_path_rate=mc.drop_path_rate, init_values=mc.init_values,
            patch_init=mc.patch_init)
        self.predictor = Predictor(
            num_patches=self.encoder.grid, embed_dim=mc.embed_dim, predictor_embed_dim=m.pred_emb_dim,
            depth=m.pred_depth, num_heads=m.pred_num_heads or mc.num_heads, mlp_ratio=mc.mlp_ratio)
        self.target_encoder = make_target(self.encoder)
        self.register_buffer("mean", torch.tensor(data_info["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_info["std"]).view(1, -1, 1, 1), persistent=False)
        self.mask_collator = MultiBlockMaskCollator(
            input_size=self.image_size, patch_size=mc.patch_size, enc_mask_scale=m.enc_mask_scale,
            pred_mask_scale=m.pred_mask_scale, aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks,
            npred=m.num_pred_masks, min_keep=m.min_keep, allow_overlap=m.allow_overlap, mode=m.mask_mode)

    # -- data ------------------------------------------------------------------------------------
    def normalize(self, images: Tensor) -> Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def train_transform(self):
        """Per-sample pipeline for file datasets (the DataLoader path): RandomResizedCrop only."""
        from visrep.data.transforms import train_transform

        return train_transform("ijepa", self.image_size, self.mean.flatten().tolist(), self.std.flatten().tolist(),
                               crop_scale=self.cfg.crop_scale, hflip=self.cfg.hflip)

    def prepare_batch(self, images: Tensor, labels: Tensor, generator: torch.Generator):
        crops = batch_random_resized_crop(images, self.image_size, scale=self.cfg.crop_scale,
                                          generator=generator, hflip=self.cfg.hflip)
        # The collator draws block sizes from its step counter and positions from the global RNG:
        # seed both from ``generator`` so that each step's masks are a pure function of the step.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.mask_collator.set_step(seed)
        with torch.random.fork_rng(devices=[]):  # CPU generator only; CUDA RNG streams stay untouched
            torch.default_generator.manual_seed(seed)
            masks_enc, masks_pred = self.mask_collator.sample(images.size(0))
        return (self.normalize(crops), labels), masks_enc, masks_pred

    def collate(self):
        return self.mask_collator

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch, step: Step) -> dict[str, Tensor]:
        (imgs, _), masks_enc, masks_pred = batch
        device = self.mean.device
        imgs = imgs.to(device, non_blocking=True)
        if imgs.dtype == torch.uint8:
            imgs = self.normalize(imgs)
        masks_enc = [m.to(device, non_blocking=True) for m in masks_enc]
        masks_pred = [m.to(device, non_blocking=True) for m in masks_pred]
        loss, _, _ = ijepa_loss(self.encoder, self.target_encoder, self.predictor, imgs, masks_enc,
                                masks_pred, self.cfg.loss)
        return {"loss": loss}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        m0, m1 = self.cfg.ema
        momentum = min(m1, linear_momentum(step.step, max(1, step.total_steps), m0, m1))
        ema_update_(self.target_encoder, self.encoder, momentum)

    def param_groups(self) -> list[dict]:
        return decay_groups(self.encoder, self.predictor)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        x = self.normalize(images.to(self.mean.device))
        return self.target_encoder.pooled(x, pool="avg")
