"""Pure loss functions; anything that uses batch statistics takes an explicit process group."""
from .jepa import jepa_loss, normalized_targets
from .sinkhorn import sinkhorn, sinkhorn_logits

__all__ = ["jepa_loss", "normalized_targets", "sinkhorn", "sinkhorn_logits"]
