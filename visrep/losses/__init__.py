"""Pure loss functions; anything that uses batch statistics takes an explicit process group."""
from .contrastive import clip_loss, llip_logits, llip_loss, llip_mix, siglip_loss
from .jepa import jepa_loss, normalized_targets

__all__ = ["clip_loss", "jepa_loss", "llip_logits", "llip_loss", "llip_mix", "normalized_targets", "siglip_loss"]
