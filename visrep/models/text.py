"""A causal text transformer (CLIP's text tower) and open_clip's BPE tokenizer.

CLIP / open_clip / Llip text tower: token embedding + learned position embedding, pre-LN blocks with
a causal mask (SDPA ``is_causal``), a final LayerNorm ``ln_final``, and the hidden state at the
end-of-text token (``tokens.argmax(-1)``: the EOT id is the largest id of the vocabulary) projected
by ``text_projection`` ([width, embed_dim], right-multiplied). The blocks are timm's, the same as
the ViT's, so both towers share one block implementation and key names.

:class:`Tokenizer` is open_clip's ``SimpleTokenizer`` (BPE, ships its vocabulary, works offline):
lower-cased and cleaned text, ``<start_of_text>`` (49406) ... ``<end_of_text>`` (49407), zero
padding, truncated to ``context_length`` with the last kept id replaced by EOT.

Official open_clip / Llip checkpoints load with :func:`visrep.hub.clip_text_state` (key mapping:
``transformer.resblocks.N.{ln_1,attn.in_proj_*,attn.out_proj,ln_2,mlp.c_fc,mlp.c_proj}`` ->
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .vit import ACT_LAYERS, attention_backend, run_blocks

__all__ = ["TextTransformer", "Tokenizer"]


class Tokenizer:
    """open_clip's BPE tokenizer: ``tokenizer(texts) -> int64 [N, context_length]``."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        self.context_length = int(context_length)
        self._tok = SimpleTokenizer(context_length=self.context_length)
        self.vocab_size = len(self._tok.encoder)
        self.eot_token_id = self._tok.eot_token_id

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self._tok(texts, context_length=self.context_length).long()


class TextTransformer(nn.Module):
    """CLIP's causal text encoder. ``encode(tokens)`` gives the EOT hidden state after ``ln_final``
    ``[B, width]`` (Llip's query is built from it); ``forward(tokens)`` its projection ``[B, embed_dim]``."""

    grad_checkpointing: bool = False   # recompute each block in the backward pass (large towers)

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 512, depth: int = 12,
                 num_heads: int = 8, mlp_ratio: float = 4.0, embed_dim: int = 512, act_layer: str = "quick_gelu",
                 norm_eps: float = 1e-5):
        super().__init__()
        self.arch = dict(vocab_size=vocab_size, context_length=context_length, width=width, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, embed_dim=embed_dim, act_layer=act_layer,
                         norm_eps=norm_eps)
        if act_layer not in ACT_LAYERS:
            raise ValueError(f"act_layer must be one of {sorted(ACT_LAYERS)}, got {act_layer!r}")
        self.context_length, self.width, self.embed_dim = context_length, width, embed_dim
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.blocks = nn.ModuleList(Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                                          act_layer=ACT_LAYERS[act_layer]) for _ in range(depth))
        self.ln_final = norm_layer(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """open_clip's ``TextTransformer.init_parameters``: N(0, 0.02) tokens, N(0, 0.01) positions,
        block weights with std width^-0.5 scaled by depth, projection std width^-0.5."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        depth = max(1, len(self.blocks))
        proj_std = self.width ** -0.5 * (2 * depth) ** -0.5
        attn_std, fc_std = self.width ** -0.5, (2 * self.width) ** -0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=attn_std)
            nn.init.zeros_(blk.attn.qkv.bias)
            nn.init.normal_(blk.attn.proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.proj.bias)
            nn.init.normal_(blk.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(blk.mlp.fc2.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.width ** -0.5)

    def encode(self, tokens: Tensor) -> Tensor:
        """Hidden state at each sequence's EOT token (``argmax`` of the ids) after ``ln_final``: [B, width]."""
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected token ids [B, <= {self.context_length}], got shape {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        with attention_backend(x):
            x = run_blocks(self.blocks, x, self.grad_checkpointing, is_causal=True)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]

    def forward(self, tokens: Tensor) -> Tensor:
        """Projected text embeddings (not normalised): [B, embed_dim]."""
        return self.encode(tokens) @ self.text_projection
