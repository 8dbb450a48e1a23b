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

Initialisation as the official training path (``src/helper.py:init_model``): every ``nn.Linear`` of
encoder and predictor is re-drawn from trunc_normal(0.02) after construction, which undoes the
per-layer 1/sqrt(2 * layer) rescale of ``attn.proj`` / ``mlp.fc2``; ``method.rescale_init=true``
keeps that rescale (the model classes' own init). The predictor's MLP ratio is 4 whatever the
encoder's. Weight decay as ``init_opt``: every parameter except names containing ``bias`` and 1-D
tensors (so the predictor's ``mask_token`` is decayed).
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
