"""I-JEPA: predict the representations of several target blocks from one context block.

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture", CVPR 2023; official code facebookresearch/ijepa @ 52c1ae9 (src/train.py).

    for each batch of images x:
        masks_enc, masks_pred = multiblock(x)                   # 1 context, 4 target blocks
        with no_grad: h = LN(target_encoder(x))[masks_pred]     # full image, non-affine LN
        z = predictor(encoder(x[masks_enc]), masks_enc, masks_pred)
        loss = smooth_l1(z, h)                                  # paper: L2 -> method.loss=l2
        step AdamW; target_encoder <- EMA (m: linear 0.996 -> 1)

Follows the released code (smooth-L1, RandomResizedCrop(0.3, 1) only, per-batch block sizes, init
and weight decay as ``init_model`` / ``init_opt``); masks never overlap unless ``mask_mode=official``.
Specification and notes: docs/methods/ijepa.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .jepa import JEPA, JEPAConfig, ijepa_loss


@dataclass
class IJEPAConfig(JEPAConfig):
    name: Literal["ijepa"] = "ijepa"


class IJEPA(JEPA):
    feature_description = "I-JEPA probe features: average-pooled last-layer tokens of the target encoder"


__all__ = ["IJEPA", "IJEPAConfig", "ijepa_loss"]
