"""Zero-shot classification with prompt templates, for any vision-language method.

A method answers three calls (``visrep.methods.clip.VisionLanguage``): ``encode_images(images)`` and
``encode_text(texts)`` return dicts of tensors with a leading sample axis, ``similarity(images,
texts)`` scores every image against every text ``[N_img, N_txt]``. The text side of a class is the
mean over its prompts of every entry, the normalised target ``zt`` renormalised (CLIP's prompt
ensembling; Llip's ``build_text_features_cmp`` also averages its queries ``q``), so for Llip the
image representation is re-mixed for every class (official ``validate_zeroshot_cmp``).

Prompts: every template x every synonym of a class, template-major (official order); a label may
be a string or a list of synonyms.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DEFAULT_TEMPLATES", "class_prompts", "aggregate_prompts", "class_text_states", "zeroshot_scores",
           "zeroshot_classification", "encode_image_batches", "concat_states"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def class_prompts(templates: Sequence[str], label: str | Sequence[str]) -> list[str]:
    """Every template filled with every synonym of ``label``, template-major."""
    names = [label] if isinstance(label, str) else list(label)
    return [t.format(name) for t in templates for name in names]


def aggregate_prompts(states: dict[str, Tensor]) -> dict[str, Tensor]:
    """One class from its prompts' text states: the mean of every entry, ``zt`` renormalised."""
    out = {k: v.mean(dim=0) for k, v in states.items()}
    if "zt" in out:
        out["zt"] = F.normalize(out["zt"], dim=-1)
    return out


def concat_states(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.cat([s[k] for s in states]) for k in states[0]}


@torch.no_grad()
def class_text_states(method, labels: Sequence[str | Sequence[str]], templates: Sequence[str] = DEFAULT_TEMPLATES
                      ) -> dict[str, Tensor]:
    """Stacked class text states ``{key: [C, ...]}``."""
    per_class = [aggregate_prompts(method.encode_text(class_prompts(templates, label))) for label in labels]
    return {k: torch.stack([c[k] for c in per_class]) for k in per_class[0]}


@torch.no_grad()
def encode_image_batches(method, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """``method.encode_images`` over ``images`` in batches, concatenated (on the method's device)."""
    device = next(method.parameters()).device
    return concat_states([method.encode_images(images[s:s + batch_size].to(device))
                          for s in range(0, images.shape[0], batch_size)])


def zeroshot_scores(similarity, image_states: dict[str, Tensor], class_states: dict[str, Tensor],
                    batch_size: int = 256, **kwargs) -> Tensor:
    """``similarity(images, classes, **kwargs)`` for image batches, concatenated: [N, C]."""
    n = next(iter(image_states.values())).shape[0]
    return torch.cat([similarity({k: v[s:s + batch_size] for k, v in image_states.items()}, class_states, **kwargs)
                      for s in range(0, n, batch_size)])


@torch.no_grad()
def zeroshot_classification(method, images: Tensor, labels: Tensor, classes: Sequence[str | Sequence[str]],
                            templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy in percent of uint8 ``images``."""
    was_training = method.training
    method.eval()
    try:
        text = class_text_states(method, classes, templates)
        scores = zeroshot_scores(method.similarity, encode_image_batches(method, images, batch_size), text,
                                 batch_size).cpu()
    finally:
        method.train(was_training)
    labels = labels.cpu()
    out = {"top1": 100.0 * (scores.argmax(dim=1) == labels).double().mean().item()}
    if scores.shape[1] > 5:
        top5 = scores.topk(5, dim=1).indices
        out["top5"] = 100.0 * (top5 == labels[:, None]).any(dim=1).double().mean().item()
    out["chance"] = 100.0 / scores.shape[1]
    return out
