from .predictor import Predictor
from .vit import VIT_SIZES, VisionTransformer, apply_masks, repeat_interleave_batch, sincos_pos_embed_2d

__all__ = ["Predictor", "VisionTransformer", "VIT_SIZES", "apply_masks", "repeat_interleave_batch", "sincos_pos_embed_2d"]
