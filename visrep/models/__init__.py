from .dit import DiT
from .heads import DINOHead
from .predictor import Predictor
from .vit import (
    HEADS_BY_DIM,
    VIT_SIZES,
    Normalize,
    VisionTransformer,
    apply_masks,
    encode_views,
    repeat_interleave_batch,
    sincos_pos_embed_2d,
    vit_from_config,
)

__all__ = ["DINOHead", "DiT", "HEADS_BY_DIM", "Normalize", "Predictor", "VisionTransformer", "VIT_SIZES", "apply_masks",
           "encode_views", "repeat_interleave_batch", "sincos_pos_embed_2d", "vit_from_config"]
