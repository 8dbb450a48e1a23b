"""Llip: contrastive vision-language pretraining where the caption mixes K visual tokens.

Lavoie et al., ICML 2024; official code facebookresearch/Llip @ d5649c3 (``VisualTransformer`` with
``ncls``, ``CMP``, ``xAttnPred``, ``CMPLoss``).

    s = ln_post(visual(x))[:, :K]; K_i, V_i = per-token projections of s
    Q_j, zt_j = EOT state of caption j @ W_q, normalize(@ W_t)
    zv[i, j] = concat_h softmax_k(K_i . Q_j / tau) V_i @ W_o         # every image x every caption
    loss = SigLIP sigmoid loss on exp(s) <normalize(zv[i, j]), zt_j> + b

As the official code: no 1/sqrt(d) in the attention (``weight_scale`` tau), query before
``text_projection``, K/Q/V LayerNorm only with ``use_norm``, ``pass_all_tokens`` mixing every token.
Specification, zero-shot and loading notes: docs/methods/llip.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visrep.errors import ConfigError
from visrep.formats import declare
from visrep.losses.contrastive import llip_logits, llip_loss, per_token_projection, split_heads

from .base import DataInfo
from .clip import LOG_1_OVER_007, VisionLanguage, VisionLanguageConfig


@dataclass
class LlipConfig(VisionLanguageConfig):
    name: Literal["llip"] = "llip"
    init_logit_scale: float = LOG_1_OVER_007     # official: CLIP's init, not SigLIP's log 10
    num_mixture_tokens: int = 32                 # K (released: 32 for B/16, 64 for G/14)
    weight_scale: float = 5.0                    # cross-attention softmax temperature tau
    xattn_heads: int = 8                         # heads of the cross-attention (independent of the towers)
    use_norm: bool = False                       # LayerNorm on K, Q, V ("-norm" configs: H/14, G/14)
    pass_all_tokens: bool = False                # every output token is a mixture token ("-alltokens")
    loss_chunk: int | None = None                # captions per checkpointed block of the B x B mixing


class MixtureCrossAttention(nn.Module):
    """Llip's parameters around the pure mixer: per-token ``k_proj`` / ``v_proj`` ``[N, vision_width, D]``,
    ``q_proj`` ``[text_width, D]``, ``out_proj`` ``[D, D]`` (right-multiplied, no biases), optional
    LayerNorms ``K_norm`` / ``Q_norm`` / ``V_norm`` over the full D. Official init: N(0, width^-1/2)."""

    def __init__(self, num_tokens: int, vision_width: int, text_width: int, embed_dim: int, num_heads: int,
                 use_norm: bool = False):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        sv, st = vision_width ** -0.5, text_width ** -0.5
        self.k_proj = nn.Parameter(sv * torch.randn(num_tokens, vision_width, embed_dim))
        self.v_proj = nn.Parameter(sv * torch.randn(num_tokens, vision_width, embed_dim))
        self.q_proj = nn.Parameter(st * torch.randn(text_width, embed_dim))
        self.out_proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        norm = (lambda: nn.LayerNorm(embed_dim)) if use_norm else nn.Identity
        self.K_norm, self.Q_norm, self.V_norm = norm(), norm(), norm()

    def keys_values(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Mixture tokens ``[B, N, vision_width]`` -> K, V ``[B, heads, N, head_dim]``."""
        K = self.K_norm(per_token_projection(tokens, self.k_proj))
        V = self.V_norm(per_token_projection(tokens, self.v_proj))
        return split_heads(K, self.num_heads), split_heads(V, self.num_heads)

    def query(self, hidden: Tensor) -> Tensor:
        """Text EOT hidden states ``[B, text_width]`` -> Q ``[B, heads, head_dim]``."""
        return split_heads(self.Q_norm(hidden @ self.q_proj), self.num_heads)


class Llip(VisionLanguage):
    feature_description = "mean of the K mixture tokens after ln_post"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        m = cfg.method
        if m.num_mixture_tokens < 1:
            raise ConfigError(f"method.num_mixture_tokens={m.num_mixture_tokens} must be >= 1")
        if m.embed_dim % m.xattn_heads:
            raise ConfigError(f"method.embed_dim={m.embed_dim} must be divisible by method.xattn_heads={m.xattn_heads}")
        if m.weight_scale <= 0:
            raise ConfigError(f"method.weight_scale={m.weight_scale} must be > 0")
        if m.loss_chunk is not None and m.loss_chunk < 1:
            raise ConfigError(f"method.loss_chunk={m.loss_chunk} must be >= 1 or null")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        m = cfg.method
        n = m.num_mixture_tokens + (self.visual.grid[0] * self.visual.grid[1] if m.pass_all_tokens else 0)
        self.mixer = MixtureCrossAttention(n, cfg.model.embed_dim, m.text_width, m.embed_dim, m.xattn_heads,
                                           m.use_norm)
        self.logit_bias = nn.Parameter(torch.tensor(float(m.init_logit_bias)))

    def vision_tokens(self) -> dict:
        return {"num_registers": self.cfg.num_mixture_tokens}

    def mixture_tokens(self, images: Tensor) -> Tensor:
        """ln_post outputs of the mixture tokens (all tokens with ``pass_all_tokens``): [B, N, width]."""
        tokens = self.visual(images)
        return tokens if self.cfg.pass_all_tokens else tokens[:, :self.cfg.num_mixture_tokens]

    def text_query_target(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Query Q [B, heads, d] and normalised target zt [B, D] of token ids."""
        h = self.text.encode(tokens)
        return self.mixer.query(h), F.normalize(h @ self.text.text_projection, dim=-1)

    def objective(self, images: Tensor, tokens: Tensor) -> Tensor:
        K, V = self.mixer.keys_values(self.mixture_tokens(images))
        Q, zt = self.text_query_target(tokens)
        self.record_health(embeddings=zt)  # the caption targets (image embeddings depend on the caption)
        return llip_loss(K, Q, V, zt, self.mixer.out_proj, self.cfg.weight_scale, self.logit_scale.exp(),
                         self.logit_bias, chunk=self.cfg.loss_chunk)

    # -- evaluation ------------------------------------------------------------------------------
    def encode_tokens(self, tokens: Tensor) -> dict[str, Tensor]:
        Q, zt = self.text_query_target(tokens)
        return {"zt": zt, "q": Q}

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> dict[str, Tensor]:
        K, V = self.mixer.keys_values(self.mixture_tokens(self.normalize(images)))
        return {"k": K, "v": V}

    def similarity(self, image: dict[str, Tensor], text: dict[str, Tensor],
                   weight_scale: float | None = None) -> Tensor:
        """Cosine of each image mixed by each text's query with that text's target: [N_img, N_txt]."""
        tau = self.cfg.weight_scale if weight_scale is None else weight_scale
        return llip_logits(image["k"], text["q"], image["v"], text["zt"], self.mixer.out_proj, tau,
                           chunk=self.cfg.loss_chunk or 256)   # at most [N_img, 256, D] mixed at once

    def export_modules(self) -> dict:
        """The vision tower also exports as the official Llip ``CMP`` state dict (the whole model)."""
        out = super().export_modules()
        out["visual"].metadata.update(declare(official="cmp"))
        return out

    def pooled_features(self, tokens: Tensor) -> Tensor:
        return tokens[:, :self.cfg.num_mixture_tokens].mean(dim=1)


__all__ = ["Llip", "LlipConfig", "MixtureCrossAttention"]
