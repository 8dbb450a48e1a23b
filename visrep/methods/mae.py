"""MAE: masked autoencoding of pixels, at any patch size (PiT's second case study: patch size 1).

He et al., CVPR 2022; official code facebookresearch/mae (``models_mae.py``, ``main_pretrain.py``).

    keep, masked = random_masking(mask_ratio)          # per sample: argsort of uniform noise
    z = encoder(x, idx_keep=keep)                       # visible tokens only
    p = decoder(z, keep -> masked)                      # [CLS] + visible + mask tokens with positions
    loss = mean over masked tokens of mean_pixels (p - (normalised) patchify(x)[masked])^2

As the official code: the decoder sees [CLS], ``model.mlp_ratio`` decoder blocks, xavier init
(``method.init``), weight decay on tokens. Differences: kept tokens in index order (official: noise
order), only masked patches predicted (same loss).
Specification and notes: docs/methods/mae.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visrep.data.crops import CropSpec, take_crops
from visrep.errors import ConfigError
from visrep.formats import declare
from visrep.losses.precision import float32_loss
from visrep.models import Predictor, apply_masks, vit_from_config
from visrep.models.vit import attention_backend, block_tail, run_blocks
from visrep.optim.groups import decay_groups

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata


@dataclass
class MAEConfig:
    name: Literal["mae"] = "mae"
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    pool: Literal["avg", "cls"] = "avg"
    init: Literal["xavier", "trunc_normal"] = "xavier"   # official initialize_weights; or our ViT default


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), p*p*C]`` (row-major patches, pixels (row, col, channel))."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, patch_size: int, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    b, p = tokens.size(0), patch_size
    x = tokens.reshape(b, height // p, width // p, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, height, width)


def random_masking(batch: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None = None,
                   device=None) -> tuple[Tensor, Tensor]:
    """Indices of the kept and of the masked tokens, ``[B, K]`` and ``[B, N - K]`` (each sorted),
    ``K = int(N (1 - mask_ratio))`` as the official code; a uniformly random subset per sample."""
    kept, masked = masking_from_noise(torch.rand(batch, num_tokens, generator=generator), mask_ratio)
    return kept.to(device), masked.to(device)


def masking_from_noise(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
    """The official ``random_masking`` given its uniform ``noise`` [B, N]: the ``K = int(N (1 - mask_ratio))``
    tokens of smallest noise are kept; returns (kept, masked) indices, each sorted."""
    keep = max(1, int(noise.size(1) * (1 - mask_ratio)))
    order = noise.argsort(dim=1)
    return order[:, :keep].sort(dim=1).values, order[:, keep:].sort(dim=1).values


def mae_no_decay(name: str, p: Tensor) -> bool:
    """MAE pretraining's weight-decay exclusion (timm ``add_weight_decay``): 1-D tensors and biases; a learned
    position table (pixel tokens, no official counterpart) is excluded too."""
    return p.ndim <= 1 or name.endswith(".bias") or "pos_embed" in name


@float32_loss
def mae_loss(pred: Tensor, target: Tensor, norm_pix: bool = False, eps: float = 1e-6) -> Tensor:
    """Mean squared error over masked tokens ``[B, M, P]``; ``norm_pix``: targets normalised per patch
    (mean and unbiased variance over the patch's P values, as the official code)."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    dtype = torch.promote_types(pred.dtype, torch.float32)  # low precision (autocast) -> float32, float64 stays
    return (pred.to(dtype) - target.to(dtype)).pow(2).mean()


def mae_official_init_(encoder: nn.Module, decoder: nn.Module) -> None:
    """The official ``initialize_weights``: every ``nn.Linear`` xavier_uniform with zero bias (encoder and
    decoder, no depth rescale), LayerNorm (1, 0), the patch projection xavier_uniform as a Linear layer,
    [CLS] and mask tokens N(0, 0.02); position tables as built (sin-cos, or learned for pixel tokens)."""
    for module in (encoder, decoder):
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    w = encoder.patch_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for token in (encoder.cls_token, encoder.register_tokens, decoder.mask_token):
        if token is not None:
            nn.init.normal_(token, std=0.02)


class MAE(Method):
    feature_description = "MAE probe features: the encoder's pooled final-normed tokens"

    @classmethod
    def validate(cls, cfg) -> None:
        m = cfg.method
        if not 0 < m.mask_ratio < 1:
            raise ConfigError(f"method.mask_ratio={m.mask_ratio} must be in (0, 1)")
        check_vit_config(cfg, class_token="method.pool=cls pools the [CLS] token" if m.pool == "cls" else None)
        if m.decoder_dim % m.decoder_heads:
            raise ConfigError(f"method.decoder_dim={m.decoder_dim} must be divisible by method.decoder_heads="
                              f"{m.decoder_heads}")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        m = self.cfg
        mc = cfg.model
        self.patch_size = mc.patch_size
        chans = self.data_info.in_chans
        if m.norm_pix_loss and mc.patch_size ** 2 * chans == 1:
            raise ConfigError("method.norm_pix_loss normalises each patch by its own statistics: a patch of one "
                              "grey pixel (model.patch_size=1, 1 channel) would become 0; turn it off")
        self.encoder = vit_from_config(mc, chans, self.image_size)
        self.decoder = Predictor(num_patches=self.encoder.grid, embed_dim=mc.embed_dim,
                                 predictor_embed_dim=m.decoder_dim, depth=m.decoder_depth,
                                 num_heads=m.decoder_heads, mlp_ratio=mc.mlp_ratio, rescale_init=False,
                                 out_dim=mc.patch_size ** 2 * chans, pos_embed=mc.pos_embed)
        self.decoder.grad_checkpointing = self.encoder.grad_checkpointing
        if m.init == "xavier":
            mae_official_init_(self.encoder, self.decoder)

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """One RandomResizedCrop (+ flip) of the full image (official ``main_pretrain.py``)."""
        m = self.cfg
        return {"main": StreamSpec(crops={"image": CropSpec(self.image_size, 1, tuple(m.crop_scale), hflip=m.hflip)})}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        crops = take_crops(batch, self.streams()["main"].crops, generator, as_float=False)
        images = self.normalize(crops["image"][:, 0])
        keep, masked = random_masking(images.size(0), self.encoder.grid[0] * self.encoder.grid[1],
                                      self.cfg.mask_ratio, generator)
        return {**batch, "image": images, "keep": keep, "masked": masked}

    # -- training --------------------------------------------------------------------------------
    def targets(self, images: Tensor, masked: Tensor) -> Tensor:
        """The pixels of the masked tokens, in the encoder's token order (its pixel permutation included)."""
        if self.encoder.pixel_permutation is not None:
            images = self.encoder.permute_pixels(images)
        return apply_masks(patchify(images, self.patch_size), masked)

    def decode(self, z: Tensor, keep: Tensor, masked: Tensor) -> Tensor:
        """Predicted pixels ``[B, M, P]`` of the ``masked`` tokens from the encoder output ``z`` [B, prefix + K, D]
        (prefix tokens first, then the ``keep`` tokens): the official decoder's sequence ([CLS], visible tokens
        with positions, a mask token with position per masked token), outputs read at the masked tokens only."""
        d, n_prefix = self.decoder, self.encoder.num_prefix
        pos = d.predictor_pos_embed[0]
        x = d.predictor_embed(z)
        x = torch.cat([x[:, :n_prefix], x[:, n_prefix:] + apply_masks(pos, keep)], dim=1)
        queries = d.mask_token.to(x.dtype) + apply_masks(pos, masked)
        x = torch.cat([x, queries], dim=1)
        with attention_backend(x):
            x = run_blocks(d.predictor_blocks[:-1], x, d.grad_checkpointing)
            x = block_tail(d.predictor_blocks[-1], x, x.size(1) - queries.size(1))
        return d.predictor_proj(d.predictor_norm(x))

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        device = self.normalize.mean.device
        images = batch["image"].to(device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        keep, masked = batch["keep"].to(device), batch["masked"].to(device)
        latent = self.encoder(images, idx_keep=keep)
        pred = self.decode(latent, keep, masked)
        self.record_health(embeddings=latent[:, self.encoder.num_prefix:].mean(1))
        return {"loss": mae_loss(pred, self.targets(images, masked), self.cfg.norm_pix_loss)}

    def param_groups(self) -> list[dict]:
        return decay_groups(self.encoder, self.decoder, no_decay=mae_no_decay)

    # -- evaluation and export -------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.encoder.pooled(self.normalize(images), pool=self.cfg.pool)

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(reconstruction, mask) of raw images in the normalised space, visible pixels pasted back;
        ``mask`` [B, 1, H, W] is 1 where pixels were masked (in the encoder's pixel order)."""
        x = self.normalize(images)
        b, c, h, w = x.shape
        keep, masked = random_masking(b, self.encoder.grid[0] * self.encoder.grid[1], self.cfg.mask_ratio,
                                      generator, device=x.device)
        target = patchify(self.encoder.permute_pixels(x) if self.encoder.pixel_permutation is not None else x,
                          self.patch_size)
        pred = self.decode(self.encoder(x, idx_keep=keep), keep, masked)
        out, flag = target.clone(), torch.zeros_like(target[..., :1])
        out.scatter_(1, masked[..., None].expand(-1, -1, out.size(-1)), pred.to(out.dtype))
        flag.scatter_(1, masked[..., None], 1.0)
        p = self.patch_size
        return unpatchify(out, p, c, h, w), unpatchify(flag.expand(-1, -1, p * p), p, 1, h, w)

    def export_modules(self) -> dict[str, Export]:
        # official: models_mae.py's MaskedAutoencoderViT (encoder + decoder, needs the [CLS] token)
        official = {"layout": "mae", "parts": {"decoder": "decoder"}} if self.encoder.arch["class_token"] else None
        formats = {"encoder": declare(official=official, timm="vit"), "decoder": {}}
        return {name: Export(getattr(self, name), {**module_metadata(getattr(self, name)), **formats[name]})
                for name in ("encoder", "decoder")}
