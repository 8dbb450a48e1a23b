"""IWM: Image World Models -- a JEPA whose predictor is told how the target view was transformed.

Garrido et al., "Learning and Leveraging World Models in Visual Representation Learning",
arXiv 2403.00504. No official code is public; built on the I-JEPA code path.

    y = jitter(crop(I)); x = jitter'(crop(I)) + grayscale + blur + solarize    # shared crop + flip
    a = action(x -> y)                                       # visrep.data.views
    masks: 4 target blocks (15-20 %), context = the rest of x (cut to the batch's shortest)
    with no_grad: h = LN(target_encoder(y))[targets]
    z = predictor(encoder(x[context]), targets, condition=a); loss = smooth_l1(z, h); EMA as I-JEPA

Our choices where the paper is silent: the action's normalisation, fixed jitter order, feature
conditioning as a zero-started residual; solarize p = 0.1 (table; prose 0.2); the context cut to the batch's
shortest by a random subset (14x14, batch 128: 71 of 196 patches on average; ``context=block``, I-JEPA's
13x13-capped block: 51). Predictor depth 12
gives IWM^Inv, 18 IWM^Equi.
Specification and notes: docs/methods/iwm.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from visrep.data.transforms import batch_resize_center_crop
from visrep.data.views import NUM_PARAMS, PhotometricSpec, action, iwm_views, photometric
from visrep.errors import ConfigError
from visrep.eval.protocols import Protocol
from visrep.eval.world_model import reciprocal_ranks
from visrep.losses import normalized_targets
from visrep.models import apply_masks

from .jepa import JEPA, JEPAConfig


@dataclass
class IWMConfig(JEPAConfig):
    name: Literal["iwm"] = "iwm"
    conditioning: Literal["feature", "sequence", "none"] = "feature"
    cond_mlp_layers: int = 3
    context: Literal["block", "complement"] = "complement"   # the paper: every patch outside the targets
    enc_mask_scale: tuple[float, float] = (1.0, 1.0)   # context="block" only: the context block's scale
    hflip: bool = True                                 # the shared crop I' is flipped too
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    source_grayscale_p: float = 0.2
    source_blur_p: float = 0.2
    source_solarize_p: float = 0.1
    mrr_candidates: int = 16       # protocol "mrr": transformed versions of each image (paper: 256)
    mrr_samples: int = 1000        # protocol "mrr": test images used


class IWM(JEPA):
    feature_description = "IWM probe features: average-pooled last-layer tokens of the target encoder"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        try:
            cls.view_specs(cfg.method)
        except ValueError as e:
            raise ConfigError(f"method (views): {e}") from None

    @staticmethod
    def view_specs(m) -> tuple[PhotometricSpec, PhotometricSpec]:
        """(source, target) photometric specs of a config's ``method`` section."""
        jitter = dict(jitter_p=m.jitter_p, brightness=m.brightness, contrast=m.contrast, saturation=m.saturation,
                      hue=m.hue)
        source = PhotometricSpec(grayscale_p=m.source_grayscale_p, blur_p=m.source_blur_p,
                                 solarize_p=m.source_solarize_p, **jitter)
        return source, PhotometricSpec(**jitter)

    def __init__(self, cfg, data_info):
        super().__init__(cfg, data_info)
        self.source_spec, self.target_spec = self.view_specs(cfg.method)

    def predictor_options(self) -> dict:
        return {"conditioning": self.cfg.conditioning, "cond_dim": NUM_PARAMS,
                "cond_mlp_layers": self.cfg.cond_mlp_layers}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images = self.crop(batch, generator)  # the shared crop I' (flipped too), from the full image
        views = iwm_views(images, generator, source=self.source_spec, target=self.target_spec)
        masks_enc, masks_pred = self.sample_masks(images.size(0), generator)
        return {**batch, "image": self.normalize(views["source"]), "target_image": self.normalize(views["target"]),
                "action": views["action"], "masks_enc": masks_enc, "masks_pred": masks_pred}

    def loss_options(self, batch: dict, imgs: Tensor) -> dict:
        """The encoder sees the source view (``image``), the target encoder the target view."""
        target = batch["target_image"].to(imgs.device, non_blocking=True)
        cond = batch["action"].to(imgs.device, non_blocking=True) if self.cfg.conditioning != "none" else None
        return {"cond": cond, "target_imgs": target}

    # -- world-model quality ---------------------------------------------------------------------
    @classmethod
    def protocols(cls) -> dict[str, Protocol]:
        return {**super().protocols(),
                "mrr": Protocol("world-model MRR (method.mrr_candidates targets, method.mrr_samples images)",
                                lambda m, ctx: m.world_model_mrr(ctx.split("test")[1][:m.cfg.mrr_samples],
                                                                 n_candidates=m.cfg.mrr_candidates,
                                                                 generator=ctx.generator))}

    @torch.no_grad()
    def world_model_mrr(self, images: Tensor, n_candidates: int = 16, generator: torch.Generator | None = None,
                        batch_size: int = 128) -> float:
        """Mean reciprocal rank of the requested transformation among ``n_candidates`` target views
        of each image (centre-cropped; one source view and one set of masks per image); see
        :mod:`visrep.eval.world_model`."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        cond_on = self.cfg.conditioning != "none"
        was_training = self.training
        self.eval()
        ranks = []
        try:
            for chunk in images.split(batch_size):
                x01 = batch_resize_center_crop(chunk.to(self.normalize.mean.device), self.image_size)
                source, ps = photometric(x01, self.source_spec, g)
                masks_enc, masks_pred = self.sample_masks(x01.size(0), g)
                masks_enc = [m.to(x01.device) for m in masks_enc]
                masks_pred = [m.to(x01.device) for m in masks_pred]
                ctx = self.encoder(self.normalize(source), idx_keep=masks_enc)
                b, nt, nx = x01.size(0), len(masks_pred), len(masks_enc)
                preds, bank = [], []
                for _ in range(n_candidates):
                    target, pt = photometric(x01, self.target_spec, g)
                    a = action(ps, pt, self.source_spec).to(ctx.dtype)
                    z = self.predictor(ctx, masks_enc, masks_pred, cond=a if cond_on else None)
                    z = z.view(nt, nx, b, *z.shape[1:]).mean(1)               # [nt, B, K, D]
                    h = apply_masks(normalized_targets(self.target_encoder(self.normalize(target))), masks_pred)
                    h = h.view(nt, b, *h.shape[1:])
                    preds.append(z.transpose(0, 1).flatten(1, 2))              # [B, nt*K, D]
                    bank.append(h.transpose(0, 1).flatten(1, 2))
                ranks.append(reciprocal_ranks(torch.stack(preds, 1), torch.stack(bank, 1)).cpu())
        finally:
            self.train(was_training)
        return float(torch.cat(ranks).mean())
