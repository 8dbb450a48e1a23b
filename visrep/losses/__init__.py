"""Pure loss functions; anything that uses batch statistics takes an explicit process group."""
from .contrastive import clip_loss, llip_logits, llip_loss, llip_mix, siglip_loss
from .dino import Centering, dino_loss, ibot_loss, koleo_loss, sinkhorn_teacher
from .jepa import jepa_loss, normalized_targets
from .precision import autocast_off, float32_loss, fp32, fp32_loss
from .prototypes import (
    me_max,
    msn_loss,
    paws_labels_matrix,
    paws_loss,
    power_law_prior,
    prior_kl,
    sharpen,
    smoothed_one_hot,
    snn,
)
from .sinkhorn import sinkhorn, sinkhorn_logits

__all__ = ["Centering", "autocast_off", "clip_loss", "dino_loss", "float32_loss", "fp32", "fp32_loss", "ibot_loss",
           "jepa_loss", "koleo_loss", "llip_logits", "llip_loss", "llip_mix", "me_max", "msn_loss",
           "normalized_targets", "paws_labels_matrix", "paws_loss", "power_law_prior", "prior_kl", "sharpen",
           "siglip_loss", "sinkhorn", "sinkhorn_logits", "sinkhorn_teacher", "smoothed_one_hot", "snn"]
