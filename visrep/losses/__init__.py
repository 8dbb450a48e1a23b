"""Pure loss functions; anything that uses batch statistics takes an explicit process group."""
<<<<<<< HEAD
from .dino import Centering, dino_loss, ibot_loss, koleo_loss, sinkhorn_teacher
=======
from .contrastive import clip_loss, llip_logits, llip_loss, llip_mix, siglip_loss
>>>>>>> vl
from .jepa import jepa_loss, normalized_targets
from .sinkhorn import sinkhorn, sinkhorn_logits

<<<<<<< HEAD
__all__ = ["Centering", "dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_teacher",
           "jepa_loss", "normalized_targets", "sinkhorn", "sinkhorn_logits"]
=======
__all__ = ["clip_loss", "jepa_loss", "llip_logits", "llip_loss", "llip_mix", "normalized_targets", "siglip_loss"]
>>>>>>> vl
