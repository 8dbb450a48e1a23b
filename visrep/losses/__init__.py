"""Pure loss functions; anything that uses batch statistics takes an explicit process group."""
from .jepa import jepa_loss, normalized_targets
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

__all__ = ["jepa_loss", "me_max", "msn_loss", "normalized_targets", "paws_labels_matrix", "paws_loss",
           "power_law_prior", "prior_kl", "sharpen", "sinkhorn", "sinkhorn_logits", "smoothed_one_hot", "snn"]
