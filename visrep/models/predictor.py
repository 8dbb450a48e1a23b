"""The narrow I-JEPA predictor, with a pluggable target-token builder.

Given context tokens (encoder output at the kept indices ``masks_x``) it predicts the target
encoder's tokens at ``masks`` (one index tensor per target block):

    x      = embed(context) + pos[masks_x]
    t_j    = target_tokens(pos[masks_j])              # I-JEPA: mask_token + pos
    out_j  = proj(norm(blocks([x ; t_j])))[:, N_ctx:]  # each target block in its own sequence

Output rows in the official order; the last block computes only the target tokens (``block_tail``).
StoP (``stop_sigma``: ``pos_j + predictor_embed(noise)``, deterministic in eval by default) and IWM
(``conditioning``: ``"feature"`` or ``"sequence"``) change only ``target_tokens`` / the sequence; MAE's
decoder is this predictor. State-dict keys are the official ones.
Specification and notes: docs/models/predictor.md
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .vit import (
    _as_list,
    apply_masks,
    attention_backend,
    block_tail,
    init_transformer_,
    repeat_interleave_batch,
    run_blocks,
    sincos_pos_embed_2d,
)

__all__ = ["Predictor"]


class Predictor(nn.Module):
    def __init__(
        self,
        num_patches: int | tuple[int, int],
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        rescale_init: bool = True,
        stop_sigma: float | None = None,
        stop_eval_noise: bool = False,
        conditioning: str = "none",
        cond_dim: int = 0,
        cond_mlp_layers: int = 3,
        out_dim: int | None = None,
        pos_embed: str = "sincos",
    ):
        super().__init__()
        self.arch = dict(num_patches=list(num_patches) if not isinstance(num_patches, int) else num_patches,
                         embed_dim=embed_dim, predictor_embed_dim=predictor_embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, norm_eps=norm_eps,
                         rescale_init=rescale_init, stop_sigma=stop_sigma, stop_eval_noise=stop_eval_noise,
                         conditioning=conditioning, cond_dim=cond_dim, cond_mlp_layers=cond_mlp_layers,
                         out_dim=out_dim, pos_embed=pos_embed)
        if conditioning not in ("none", "feature", "sequence"):
            raise ValueError(f"conditioning must be 'none', 'feature' or 'sequence', got {conditioning!r}")
        if conditioning != "none" and cond_dim < 1:
            raise ValueError(f"conditioning={conditioning!r} needs cond_dim >= 1")
        if cond_mlp_layers < 1:
            raise ValueError(f"cond_mlp_layers must be >= 1, got {cond_mlp_layers}")
        self.conditioning, self.cond_dim = conditioning, cond_dim
        self.grad_checkpointing = False  # activation checkpointing per block (runtime switch)
        if stop_sigma is not None and stop_sigma < 0:
            raise ValueError(f"stop_sigma must be >= 0, got {stop_sigma}")
        self.stop_sigma, self.stop_eval_noise = stop_sigma, stop_eval_noise
        if depth < 1:
            raise ValueError(f"the predictor needs at least one block, got depth={depth}")
        if isinstance(num_patches, int):
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ValueError(f"num_patches={num_patches} is not a square grid; pass (grid_h, grid_w)")
            num_patches = (side, side)
        self.grid = tuple(num_patches)
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        if pos_embed == "sincos":
            table = sincos_pos_embed_2d(predictor_embed_dim, *self.grid, dtype=torch.float32)
            self.predictor_pos_embed = nn.Parameter(table.unsqueeze(0), requires_grad=False)
        elif pos_embed == "learned":  # pixel tokens without a 2-D prior (PiT's MAE decoder)
            self.predictor_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], predictor_embed_dim))
        else:
            raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {pos_embed!r}")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i],
                  norm_layer=norm_layer) for i in range(depth))
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.predictor_proj = nn.Linear(predictor_embed_dim, out_dim or embed_dim, bias=True)
        self._init_weights(rescale_init)
        if pos_embed == "learned":
            trunc_normal_(self.predictor_pos_embed, std=0.02)
        d = predictor_embed_dim
        if conditioning == "feature":
            layers: list[nn.Module] = []
            for i in range(cond_mlp_layers):
                layers.append(nn.Linear(d + cond_dim if i == 0 else d, d))
                if i < cond_mlp_layers - 1:
                    layers.append(nn.GELU())
            self.cond_mlp = nn.Sequential(*layers)
            for m in self.cond_mlp:
                if isinstance(m, nn.Linear):
                    trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            self.cond_gate = nn.Parameter(torch.zeros(1))  # starts as the unconditioned predictor
        elif conditioning == "sequence":
            self.cond_weight = nn.Parameter(torch.zeros(cond_dim, d))
            self.cond_bias = nn.Parameter(torch.zeros(cond_dim, d))
            trunc_normal_(self.cond_weight, std=0.02)
            trunc_normal_(self.cond_bias, std=0.02)
        if stop_sigma is not None:
            self.mask_token.requires_grad_(False)  # unused by StoP (kept: official state-dict layout)

    def _init_weights(self, rescale: bool) -> None:
        init_transformer_(self, self.predictor_blocks, rescale)
        trunc_normal_(self.mask_token, std=0.02)

    def target_tokens(self, pos: Tensor, noise: Tensor | None = None) -> Tensor:
        """Query tokens for the target positions ``pos`` [R, K, d]: I-JEPA uses mask_token + pos;
        StoP ``pos + predictor_embed(noise)`` with ``noise`` [R, K, embed_dim] (None: the noise mean, 0)."""
        if self.stop_sigma is None:
            return self.mask_token.to(pos.dtype) + pos
        if noise is None:
            return pos + self.predictor_embed.bias.to(pos.dtype)
        return pos + self.predictor_embed(noise.to(pos.dtype))

    def draws_noise(self) -> bool:
        """Whether a forward pass uses StoP noise (training mode, or eval with ``stop_eval_noise``)."""
        return self.stop_sigma is not None and (self.training or self.stop_eval_noise)

    def forward(self, x: Tensor, masks_x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor],
                noise: Tensor | Sequence[Tensor] | None = None, cond: Tensor | None = None) -> Tensor:
        """``noise`` (StoP only): one tensor per target block, ``[len(masks_x) * B, K, embed_dim]``
        rows ordered (context mask, sample) as ``x``, already scaled by ``stop_sigma``; drawn here
        from the global RNG when omitted and :meth:`draws_noise`. ``cond`` (IWM): ``[B, cond_dim]``
        transformation parameters of each sample (required when ``conditioning`` is not "none")."""
        masks_x, masks = _as_list(masks_x), _as_list(masks)
        batch = x.size(0) // len(masks_x)
        pos = self.predictor_pos_embed[0]                                  # [N, d], shared table

        x = self.predictor_embed(x) + apply_masks(pos, masks_x)            # [nx*B, Nc, d]
        n_ctx = x.size(1)
        target_pos = repeat_interleave_batch(apply_masks(pos, masks), batch, repeat=len(masks_x))
        if not self.draws_noise():
            noise = None
        elif noise is None:
            noise = torch.randn(*target_pos.shape[:2], self.predictor_embed.in_features, device=x.device,
                                dtype=x.dtype) * self.stop_sigma
        elif not isinstance(noise, Tensor):
            noise = torch.cat(list(noise), dim=0)                         # target-block-major rows
        queries = self.target_tokens(target_pos, noise)                   # [nt*nx*B, Nt, d]
        if self.conditioning != "none":
            if cond is None or cond.shape != (batch, self.cond_dim):
                got = None if cond is None else tuple(cond.shape)
                raise ValueError(f"conditioning={self.conditioning!r} needs cond of shape [{batch}, {self.cond_dim}], "
                                 f"got {got}")
            cond = cond.to(x.dtype)
            if self.conditioning == "feature":                           # rows (target, context, sample)
                a = cond.repeat(len(masks) * len(masks_x), 1)[:, None].expand(-1, queries.size(1), -1)
                queries = queries + self.cond_gate * self.cond_mlp(torch.cat([queries, a], dim=-1))
            else:                                                         # action tokens after the context
                tokens = cond[:, :, None] * self.cond_weight + self.cond_bias           # [B, P, d]
                x = torch.cat([x, tokens.repeat(len(masks_x), 1, 1)], dim=1)
                n_ctx = x.size(1)
        x = torch.cat([x.repeat(len(masks), 1, 1), queries], dim=1)
        with attention_backend(x):
            x = run_blocks(self.predictor_blocks[:-1], x, self.grad_checkpointing)
            x = block_tail(self.predictor_blocks[-1], x, n_ctx)  # context outputs are never used
        return self.predictor_proj(self.predictor_norm(x))
