"""Pure loss functions; anything that uses batch statistics takes an explicit process group."""
from .dino import Centering, dino_loss, ibot_loss, koleo_loss, sinkhorn_teacher
from .jepa import jepa_loss, normalized_targets
from .sinkhorn import sinkhorn, sinkhorn_logits

__all__ = ["Centering", "dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_teacher",
           "jepa_loss", "normalized_targets", "sinkhorn", "sinkhorn_logits"]
