"""Our ViT and predictor configured as the official models (key names and defaults as theirs).

``visrep.hub`` re-exports these beside the checkpoint key mapping; methods build from them directly.
"""
from __future__ import annotations

from .predictor import Predictor
from .vit import VisionTransformer, clip_init_


def ijepa_vit(**kwargs) -> VisionTransformer:
    """Our ViT configured as the official I-JEPA encoder (sin-cos, no CLS, LN eps 1e-6)."""
    kwargs.setdefault("pos_embed", "sincos")
    kwargs.setdefault("class_token", False)
    return VisionTransformer(**kwargs)


def dinov2_vit(num_register_tokens: int = 0, init_values: float | None = 1e-5, **kwargs) -> VisionTransformer:
    """Our ViT configured as the official DINOv2 backbone (learned pos, CLS, registers, LayerScale, mask token)."""
    if str(kwargs.pop("ffn_layer", "mlp")).startswith("swiglu"):  # swiglu / swiglufused: the same FFN
        kwargs["ffn"] = "swiglu"
    for k in ("ffn_bias", "proj_bias", "drop_path_uniform", "block_fn", "block_chunks"):
        kwargs.pop(k, None)
    return VisionTransformer(pos_embed="learned", class_token=True, num_registers=num_register_tokens,
                             mask_token=True, init_values=init_values, rescale_init=False, **kwargs)


def ijepa_predictor(**kwargs) -> Predictor:
    return Predictor(**kwargs)


def clip_vit(official_init: bool = True, **kwargs) -> VisionTransformer:
    """Our ViT configured as CLIP's / Llip's vision tower: learned positions (also for the [CLS] or
    mixture tokens, ``register_pos``), ``ln_pre``, QuickGELU, bias-free patch conv, LN eps 1e-5;
    initialised as the official tower (:func:`visrep.models.vit.clip_init_`) unless ``official_init=False``."""
    for k, v in dict(pos_embed="learned", pre_norm=True, act_layer="quick_gelu", patch_bias=False, norm_eps=1e-5,
                     rescale_init=False, register_pos=kwargs.get("num_registers", 0) > 0).items():
        kwargs.setdefault(k, v)
    vit = VisionTransformer(**kwargs)
    if official_init:
        clip_init_(vit)
    return vit


__all__ = ["clip_vit", "dinov2_vit", "ijepa_predictor", "ijepa_vit"]
