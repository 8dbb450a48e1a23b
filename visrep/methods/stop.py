"""StoP / FlexPredict: I-JEPA whose predictor sees stochastic positions for the target tokens.

Bar et al., "Stochastic positional embeddings improve masked image modeling", ICML 2024 (v1:
FlexPredict); official code amirbar/StoP @ 72206b3 (``main.py``, ``src/deit.py``).

    masks_enc, masks_pred = multiblock(x); n_j ~ N(0, sigma^2 I) in the encoder's width
    with no_grad: h = LN(mean of the target encoder's last K normed blocks)(x)[masks_pred]
    t_j = pos_j + predictor_embed(n_j)            # the context's own projection, no mask token
    z = predictor(encoder(x[masks_enc]), t); loss = smooth_l1(z, h); AdamW; EMA as I-JEPA

Follows the released code (sigma is a standard deviation: 0.25 ViT-B/L, 0.2 ViT-H). Difference: the
predictor is deterministic at evaluation (``pos + bias``); ``method.stop_eval_noise=true`` adds noise
in eval mode too, as the official code.
Specification and notes: docs/methods/stop.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from visrep.errors import ConfigError

from .jepa import JEPA, JEPAConfig


@dataclass
class StoPConfig(JEPAConfig):
    name: Literal["stop"] = "stop"
    stop_sigma: float = 0.25                 # noise std (official YAML key ``var``)
    stop_eval_noise: bool = False            # official: noise in eval mode too
    target_blocks: int = 1                   # average of the target encoder's last K blocks
    pairing: Literal["rows", "blocks"] = "rows"  # official StoP order (see the module docstring)
    blur_p: float = 0.0                      # official recipes: Gaussian blur p=0.5, sigma 0.1-2
    grayscale_p: float = 0.0                 # official recipes: RandomGrayscale p=0.2


class StoP(JEPA):
    feature_description = "StoP probe features: average-pooled last-layer tokens of the target encoder"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        m = cfg.method
        if m.stop_sigma < 0:
            raise ConfigError(f"method.stop_sigma={m.stop_sigma} must be >= 0 (a standard deviation)")
        if not 1 <= m.target_blocks <= cfg.model.depth:
            raise ConfigError(f"method.target_blocks={m.target_blocks} must be in 1..model.depth={cfg.model.depth}")
        for key in ("blur_p", "grayscale_p"):
            if not 0.0 <= getattr(m, key) <= 1.0:
                raise ConfigError(f"method.{key}={getattr(m, key)} must be a probability in [0, 1]")

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The official recipes' blur (p 0.5) and grayscale (p 0.2) after the crop (no colour jitter:
        ``color_jitter_strength: 0.0``), batched with per-sample parameters."""
        from visrep.data.views import PhotometricSpec, photometric

        if not (self.cfg.blur_p or self.cfg.grayscale_p):
            return images
        spec = PhotometricSpec(jitter_p=0.0, grayscale_p=self.cfg.grayscale_p, blur_p=self.cfg.blur_p)
        return photometric(images, spec, generator)[0]

    def predictor_options(self) -> dict:
        return {"stop_sigma": self.cfg.stop_sigma, "stop_eval_noise": self.cfg.stop_eval_noise}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        batch = super().prepare_batch(batch, generator)
        b, n_ctx, width = batch["image"].size(0), len(batch["masks_enc"]), self.encoder.embed_dim
        # one noise tensor per target block, [B, n_ctx, K, width]: per sample first, so that any
        # split of the batch (processes) sees the same noise as the whole batch
        batch["stop_noise"] = [torch.randn(b, n_ctx, m.size(1), width, generator=generator) * self.cfg.stop_sigma
                               for m in batch["masks_pred"]]
        return batch

    def loss_options(self, batch: dict, imgs: Tensor) -> dict:
        noise = [n.to(device=imgs.device, dtype=imgs.dtype, non_blocking=True).transpose(0, 1).flatten(0, 1)
                 for n in batch["stop_noise"]]                     # rows (context mask, sample)
        return {"target_blocks": self.cfg.target_blocks, "pairing": self.cfg.pairing, "noise": noise}
