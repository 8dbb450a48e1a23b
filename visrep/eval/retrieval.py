"""Image-text retrieval, Recall@K both ways, for any vision-language method.

Every image has one or more captions (COCO: 5). Image -> text: an image counts as retrieved at K
when any of its captions is among the K best-scoring texts; text -> image: a caption counts when its
image is among the K best-scoring images. Scores come from ``method.similarity`` (for Llip each image
is re-mixed by every caption), computed in image blocks.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .zeroshot import concat_states, encode_image_batches, zeroshot_scores

__all__ = ["recall_at_k", "retrieval_scores", "image_text_retrieval"]


def recall_at_k(scores: Tensor, text_to_image: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent from ``scores [N_img, N_txt]`` and each text's image index ``[N_txt]``."""
    n_img, n_txt = scores.shape
    owner = text_to_image.to(scores.device)
    out = {}
    # image -> text: rank of the best-ranked own caption
    order = scores.argsort(dim=1, descending=True)                                   # [N_img, N_txt]
    own = owner[order] == torch.arange(n_img, device=scores.device)[:, None]
    first = own.float().argmax(dim=1)
    # text -> image: rank of the caption's image
    own_score = scores[owner, torch.arange(n_txt, device=scores.device)]
    rank_t = (scores.T > own_score[:, None]).sum(dim=1)
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * (first < k).double().mean().item()
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * (rank_t < k).double().mean().item()
    return out


@torch.no_grad()
def retrieval_scores(method, images: Tensor, captions: Sequence[Sequence[str]], batch_size: int = 256
                     ) -> tuple[Tensor, Tensor]:
    """``(scores [N_img, N_txt], text_to_image [N_txt])`` for uint8 images and each image's captions."""
    texts = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    text = concat_states([method.encode_text(texts[s:s + batch_size]) for s in range(0, len(texts), batch_size)])
    scores = zeroshot_scores(method.similarity, encode_image_batches(method, images, batch_size), text, batch_size)
    return scores.cpu(), owner


@torch.no_grad()
def image_text_retrieval(method, images: Tensor, captions: Sequence[Sequence[str]], batch_size: int = 256,
                         ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K (percent) both ways, plus the chance level of image -> text R@1 and text -> image R@1."""
    was_training = method.training
    method.eval()
    try:
        scores, owner = retrieval_scores(method, images, captions, batch_size)
    finally:
        method.train(was_training)
    out = recall_at_k(scores, owner, ks)
    n_img, n_txt = scores.shape
    out["chance_t2i_r1"] = 100.0 / n_img
    out["chance_i2t_r1"] = 100.0 * sum(min(1.0, len(c) / n_txt) for c in captions) / n_img
    return out
