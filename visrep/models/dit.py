"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, "Scalable Diffusion
Models with Transformers", ICCV 2023), built from timm's layers.

    tokens = PatchEmbed_p(x) + pos; c = TimestepEmbed(t) + LabelEmbed(y)   # any p, 1 included
    for each block:                                  # adaLN-Zero, modulation zero-initialised
        shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c))
        tokens += gate1 * Attention(LN(tokens) * (1 + scale1) + shift1)
        tokens += gate2 * MLP(LN(tokens) * (1 + scale2) + shift2)
    return unpatchify(Linear(LN(tokens) * (1 + scale) + shift))   # final adaLN layer, zero-init

Initialisation and state-dict keys as the official DiT code; ``pos_embed="learned"`` for PiT's
pixels-as-tokens setting, ``learn_sigma``, ``num_classes=0`` (unconditional), ``grad_checkpointing``.
Specification and notes: docs/models/dit.md
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from .vit import attention_backend, run_blocks, sincos_pos_embed_2d

__all__ = ["DiT", "DiTBlock", "FinalLayer", "LabelEmbedder", "TimestepEmbedder", "modulate", "timestep_sinusoid"]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with per-sample ``shift``/``scale`` [B, D] over tokens [B, N, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] (possibly fractional) timesteps -> [B, dim]: ``[cos(t w_k), sin(t w_k)]``,
    ``w_k = max_period^(-k / (dim/2))`` (the DiT / ADM layout; odd ``dim`` gets a zero column)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: a fixed sinusoid of ``frequency_dim`` channels, then an MLP."""

    def __init__(self, hidden: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_sinusoid(t, self.frequency_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null class of classifier-free guidance.

    Label dropout is the caller's (the diffusion method draws it from its step generator): it hands
    in ``num_classes`` for the dropped labels."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """A pre-LN transformer block whose norms are modulated by the conditioning ``c`` (adaLN-Zero)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map from each token to its patch's values."""

    def __init__(self, hidden: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer ``(x_t, t, y) -> epsilon`` (and the variance channels with ``learn_sigma``)."""

    def __init__(self, img_size: int = 32, patch_size: int = 2, in_chans: int = 4, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 0,
                 learn_sigma: bool = False, pos_embed: str = "sincos", qkv_bias: bool = True,
                 frequency_dim: int = 256):
        super().__init__()
        # constructor arguments, enough to rebuild this module (exports, ``visrep.hub.load_exported``)
        self.arch = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                         learn_sigma=learn_sigma, pos_embed=pos_embed, qkv_bias=qkv_bias, frequency_dim=frequency_dim)
        if pos_embed not in ("sincos", "learned"):
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.out_chans = 2 * in_chans if learn_sigma else in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.grad_checkpointing = False  # a runtime switch, not architecture

        self.x_embedder = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=True)
        self.grid = self.x_embedder.grid_size
        if pos_embed == "sincos":
            table = sincos_pos_embed_2d(embed_dim, *self.grid, dtype=torch.float32).unsqueeze(0)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.pos_embed_type = pos_embed
        self.t_embedder = TimestepEmbedder(embed_dim, frequency_dim)
        self.y_embedder = LabelEmbedder(num_classes, embed_dim) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.final_layer = FinalLayer(embed_dim, patch_size, self.out_chans)
        self._init_weights()

    @property
    def null_class(self) -> int | None:
        """The label id of "no class" (classifier-free guidance), None for an unconditional model."""
        return self.num_classes if self.num_classes else None

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # the patch projection initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.pos_embed_type == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for blk in self.blocks:  # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # -- pieces ----------------------------------------------------------------------------------
    def condition(self, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """The conditioning vector ``c`` [B, D]: timestep embedding (+ label embedding)."""
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if labels is None:
                labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            c = c + self.y_embedder(labels)
        return c

    def tokens(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The last block's tokens [B, N, D] and the conditioning ``c`` (before the final layer)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans or tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"expected inputs [B, {self.in_chans}, {self.img_size}, {self.img_size}], "
                             f"got {tuple(x.shape)}")
        c = self.condition(t, labels)
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        with attention_backend(h):
            h = run_blocks(self.blocks, h, self.grad_checkpointing, c=c)
        return h, c

    def unpatchify(self, x: Tensor) -> Tensor:
        """[B, N, p*p*C] -> [B, C, H, W] (token order row-major, channels last within a patch)."""
        p, (gh, gw), c = self.patch_size, self.grid, self.out_chans
        x = x.reshape(x.size(0), gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.size(0), c, gh * p, gw * p)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predicted noise [B, C, H, W] (with ``learn_sigma``: noise then variance channels, [B, 2C, H, W])."""
        h, c = self.tokens(x, t, labels)
        return self.unpatchify(self.final_layer(h, c))

    def pooled(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Mean over tokens of the last block's layer-normed tokens [B, D] (probe features)."""
        h, _ = self.tokens(x, t, labels)
        return F.layer_norm(h, (h.shape[-1],), eps=1e-6).mean(dim=1)
