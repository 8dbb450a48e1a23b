"""Contrastive vision-language pretraining: CLIP and SigLIP, and the pieces Llip shares with them.

Radford et al. 2021 (CLIP), Zhai et al. 2023 (SigLIP); open_clip's ``ClipLoss`` / ``SigLipLoss``.

    x = normalize(RandomResizedCrop(0.9, 1)(image)); caption = one of the image's captions
    z_img = normalize(visual(x)[CLS] @ image_projection); z_txt = normalize(text(caption))
    loss = clip_loss / siglip_loss (negatives from every process); logit_scale clamped to [0, ln 100]

As open_clip: CLIP's tower layout (learned positions, ``ln_pre``, QuickGELU, LN eps 1e-5), no weight
decay on 1-D tensors, biases, logit scale / bias; logits under autocast as the official code.
Specification and notes: docs/methods/clip.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.data.crops import CropSpec, take_crops
from visrep.errors import ConfigError
from visrep.formats import declare
from visrep.losses.contrastive import clip_loss, siglip_loss
from visrep.models.text import TextTransformer, Tokenizer
from visrep.optim.groups import decay_groups

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata

LOG_1_OVER_007 = math.log(1 / 0.07)


@dataclass
class VisionLanguageConfig:
    """Settings shared by CLIP, SigLIP and Llip (the vision tower's size is the ``model`` section)."""

    name: str = ""
    embed_dim: int = 512                    # shared image-text space
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    context_length: int = 77
    act_layer: Literal["quick_gelu", "gelu"] = "quick_gelu"
    init_logit_scale: float = LOG_1_OVER_007
    init_logit_bias: float = -10.0          # SigLIP / Llip only
    max_logit_scale: float = math.log(100)  # clamp of the log scale after every step (open_clip)
    crop_scale: tuple[float, float] = (0.9, 1.0)   # open_clip's RandomResizedCrop
    caption: Literal["random", "first"] = "random"  # which of an image's captions a step uses


@dataclass
class CLIPConfig(VisionLanguageConfig):
    name: Literal["clip"] = "clip"


@dataclass
class SigLIPConfig(VisionLanguageConfig):
    name: Literal["siglip"] = "siglip"
    init_logit_scale: float = math.log(10.0)


def no_decay_open_clip(name: str, p: Tensor) -> bool:
    """open_clip's exclusion (``open_clip_train/main.py``: ``p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n
    or "logit_scale" in n``): tensors with < 2 dims in the official layout (norms, gains, the class token),
    biases and the logit scale / bias. Our [CLS] token is ``[1, 1, width]``, open_clip's ``class_embedding``
    ``[width]``: excluded too (Llip's mixture tokens are 2-D ``[K, width]`` officially and stay decayed)."""
    return p.ndim < 2 or "bias" in name or "logit_scale" in name or name.endswith("cls_token")


class VisionLanguage(Method):
    """What CLIP, SigLIP and Llip share: towers, captions, crops, the logit scale, the eval interface.

    Subclasses define ``vision_tokens()`` (extra ViT arguments), ``objective(images, tokens)`` and
    the image side of the eval interface (``encode_images``, ``similarity``, ``pooled_features``)."""

    feature_description = "image tower output before the projection ([CLS] after ln_post)"

    @classmethod
    def validate(cls, cfg) -> None:
        mc, m = cfg.model, cfg.method
        if mc.num_registers or mc.class_token:
            raise ConfigError("vision-language methods set the tower's prefix tokens themselves: model.class_token "
                              "must be false and model.num_registers 0")
        check_vit_config(cfg)
        if m.text_width % m.text_heads:
            raise ConfigError(f"method.text_width={m.text_width} must be divisible by method.text_heads={m.text_heads}")
        if m.context_length < 3:
            raise ConfigError(f"method.context_length={m.context_length} must be >= 3 (start, a word, end)")

    def __init__(self, cfg, data_info: DataInfo):
        from visrep.models.presets import clip_vit

        super().__init__(cfg, data_info)
        m, mc = cfg.method, cfg.model
        self.tokenizer = Tokenizer(m.context_length)
        self.visual = clip_vit(img_size=self.image_size, patch_size=mc.patch_size, in_chans=self.data_info.in_chans,
                               embed_dim=mc.embed_dim, depth=mc.depth, num_heads=mc.num_heads, mlp_ratio=mc.mlp_ratio,
                               drop_path_rate=mc.drop_path_rate, patch_init=mc.patch_init, act_layer=m.act_layer,
                               **self.vision_tokens())
        self.text = TextTransformer(vocab_size=self.tokenizer.vocab_size, context_length=m.context_length,
                                    width=m.text_width, depth=m.text_depth, num_heads=m.text_heads,
                                    embed_dim=m.embed_dim, act_layer=m.act_layer)
        self.logit_scale = nn.Parameter(torch.tensor(float(m.init_logit_scale)))
        self.visual.grad_checkpointing = self.text.grad_checkpointing = mc.grad_checkpointing

    def vision_tokens(self) -> dict:
        return {"class_token": True}

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """Captions and one RandomResizedCrop of the full image (open_clip's train transform, no flip)."""
        return {"main": StreamSpec(captions=True,
                                   crops={"image": CropSpec(self.image_size, 1, tuple(self.cfg.crop_scale))})}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images = take_crops(batch, self.streams()["main"].crops, generator, as_float=False)["image"][:, 0]
        captions = batch["caption"]
        if any(not c for c in captions):
            raise ValueError("every image needs at least one caption")
        if self.cfg.caption == "random":
            u = torch.rand(len(captions), generator=generator).tolist()
            chosen = [c[min(int(x * len(c)), len(c) - 1)] for c, x in zip(captions, u)]
        else:
            chosen = [c[0] for c in captions]
        return {**batch, "image": self.normalize(images), "text": self.tokenizer(chosen).to(images.device)}

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        device = self.logit_scale.device
        images = batch["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        loss = self.objective(images, batch["text"].to(device, non_blocking=True))
        return {"loss": loss, "logit_scale": self.logit_scale.detach().exp()}

    def objective(self, images: Tensor, tokens: Tensor) -> Tensor:
        raise NotImplementedError

    def param_groups(self) -> list[dict]:
        return decay_groups(self, no_decay=no_decay_open_clip)

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        self.logit_scale.clamp_(0, self.cfg.max_logit_scale)

    # -- text ------------------------------------------------------------------------------------
    def encode_tokens(self, tokens: Tensor) -> dict[str, Tensor]:
        """``{"zt": normalised text embeddings}`` of token ids ``[N, L]``."""
        return {"zt": F.normalize(self.text(tokens), dim=-1)}

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> dict[str, Tensor]:
        return self.encode_tokens(self.tokenizer(texts).to(self.logit_scale.device))

    # -- evaluation and export -------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        return self.visual

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.pooled_features(self.visual(self.normalize(images)))

    def pooled_features(self, tokens: Tensor) -> Tensor:
        return tokens[:, 0]

    def export_modules(self) -> dict[str, Export]:
        return {name: Export(getattr(self, name), module_metadata(getattr(self, name))) for name in ("visual", "text")}


class _GlobalEmbedding(VisionLanguage):
    """CLIP and SigLIP: one image embedding, ``normalize([CLS] @ image_projection)``."""

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        width = cfg.model.embed_dim
        self.image_projection = nn.Parameter(width ** -0.5 * torch.randn(width, cfg.method.embed_dim))

    def embed_image(self, images: Tensor) -> Tensor:
        return F.normalize(self.pooled_features(self.visual(images)) @ self.image_projection, dim=-1)

    def export_modules(self) -> dict[str, Export]:
        """The vision tower also exports as a whole open_clip ``CLIP`` (towers, projection, logit scale / bias)."""
        out = super().export_modules()
        parts = {"text": "text", "image_projection": "image_projection", "logit_scale": "logit_scale"}
        if "logit_bias" in self._parameters:
            parts["logit_bias"] = "logit_bias"
        out["visual"].metadata.update(declare(open_clip={"layout": "open_clip", "parts": parts}))
        return out

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        return {"z": self.embed_image(self.normalize(images))}

    def similarity(self, image: dict[str, Tensor], text: dict[str, Tensor]) -> Tensor:
        """Cosine of every image with every text: ``[N_img, N_txt]``."""
        return image["z"] @ text["zt"].T


class CLIP(_GlobalEmbedding):
    def objective(self, images: Tensor, tokens: Tensor) -> Tensor:
        zt, zi = self.encode_tokens(tokens)["zt"], self.embed_image(images)
        self.record_health(embeddings=zi)
        return clip_loss(zi, zt, self.logit_scale.exp())


class SigLIP(_GlobalEmbedding):
    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.method.init_logit_bias)))

    def objective(self, images: Tensor, tokens: Tensor) -> Tensor:
        zt, zi = self.encode_tokens(tokens)["zt"], self.embed_image(images)
        self.record_health(embeddings=zi)
        return siglip_loss(zi, zt, self.logit_scale.exp(), self.logit_bias)


__all__ = ["CLIP", "CLIPConfig", "SigLIP", "SigLIPConfig", "VisionLanguage", "VisionLanguageConfig",
           "no_decay_open_clip"]
