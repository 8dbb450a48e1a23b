"""MSN (Masked Siamese Networks) and PMSN (MSN with a power-law prior over prototypes).

Assran et al., "Masked Siamese Networks for Label-Efficient Learning", ECCV 2022; official code
facebookresearch/msn @ 4388dc1 (``src/msn_train.py``, ``src/losses.py``, ``src/deit.py``).
PMSN: Assran et al., "The Hidden Uniform Cluster Prior in Self-Supervised Learning", ICLR 2023 (no code).

    t, a_1..a_R = R + 1 random crops (a_i lose patches: patch_drop); f_1..f_F = F focal crops
    with no_grad: h = head'(target_encoder'(t))           # unmasked EMA copy of encoder + head
    z = head(encoder([a_1..a_R], idx_keep)), head(encoder([f_1..f_F]))   # one call per size
    loss = CE(sinkhorn(sharpen(snn(h, P), T)), snn(z, P)) + me_max(mean snn(z, P))
    AdamW (prototypes P: no wd, gradient summed over processes); target <- EMA (0.996 -> 1)

Follows the released code (``configs/pretrain/msn_vits16.yaml``). PMSN (``method.name=pmsn``): KL to
the prior ``pi_k ∝ k^(-prior_exponent)``, default KL(pbar || pi) (``method.kl_direction``).
Specification and notes: docs/methods/msn.md
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visrep import distributed as D
from visrep.data.crops import CropSpec, take_crops
from visrep.data.views import PhotometricSpec, photometric_views
from visrep.errors import ConfigError
from visrep.formats import declare
from visrep.losses import fp32_loss, msn_loss, power_law_prior
from visrep.models import encode_views, vit_from_config
from visrep.models.projection import ProjectionHead
from visrep.models.vit import redraw_linear_
from visrep.optim.ema import ema_update_, make_target
from visrep.optim.groups import decay_groups, no_decay_bias_bn
from visrep.optim.schedules import linear_momentum

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata


@dataclass
class MSNConfig:
    name: Literal["msn"] = "msn"
    num_prototypes: int = 1024
    hidden_dim: int = 2048
    output_dim: int = 256
    use_bn: bool = True
    temperature: float = 0.1
    sharpen: tuple[float, float] = (0.25, 0.25)     # (start, final) T, linear over the horizon
    ema: tuple[float, float] = (0.996, 1.0)
    me_max_weight: float = 1.0
    entropy_weight: float = 0.0
    use_sinkhorn: bool = True
    sinkhorn_iters: int = 3
    label_smoothing: float = 0.0
    freeze_prototypes: bool = False
    proto_grad_reduce: Literal["sum", "mean"] = "sum"   # official: summed over processes
    clip_grad: float | None = 3.0                      # encoder + head only (official)
    patch_drop: float = 0.15
    rand_views: int = 1                                 # masked anchor views (the target view is extra)
    focal_views: int = 10
    rand_size: int | None = None                        # None: data.image_size
    focal_size: int = 96
    rand_crop_scale: tuple[float, float] = (0.3, 1.0)
    focal_crop_scale: tuple[float, float] = (0.05, 0.3)
    hflip: bool = True
    color_jitter: float = 0.5                           # strength s: jitter (0.8s, 0.8s, 0.8s, 0.2s)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    prior: Literal["uniform", "power_law"] = "uniform"
    prior_exponent: float = 0.25
    kl_direction: Literal["mean_to_prior", "prior_to_mean"] = "mean_to_prior"
    sinkhorn_follows_prior: bool = True
    feature_norm: bool = False                          # official probe: no final LayerNorm


@dataclass
class PMSNConfig(MSNConfig):
    name: Literal["pmsn"] = "pmsn"
    prior: Literal["uniform", "power_law"] = "power_law"


def num_kept(num_patches: int, patch_drop: float) -> int:
    """Patches an anchor keeps: ``floor(N * (1 - patch_drop))`` (official ``forward_features``)."""
    return int(math.floor(num_patches * (1.0 - patch_drop)))


class MSN(Method):
    feature_description = "MSN probe features: target encoder's last-block [CLS] before the final LayerNorm"

    @classmethod
    def validate(cls, cfg) -> None:
        mc, m = cfg.model, cfg.method
        rand = m.rand_size or cfg.data.image_size
        check_vit_config(cfg, {"method.rand_size": rand, "method.focal_size": m.focal_size},
                         class_token="MSN represents an image by its [CLS] token")
        if not 0.0 <= m.patch_drop < 1.0:
            raise ConfigError(f"method.patch_drop={m.patch_drop} must be in [0, 1)")
        if m.patch_drop and num_kept((rand // mc.patch_size) ** 2, m.patch_drop) < 1:
            raise ConfigError(f"method.patch_drop={m.patch_drop} keeps no patch of a {rand}px view")
        if m.rand_views < 1 or m.focal_views < 0:
            raise ConfigError("method.rand_views must be >= 1 and method.focal_views >= 0")
        if m.num_prototypes < 2 or m.temperature <= 0 or min(m.sharpen) <= 0:
            raise ConfigError("method.num_prototypes must be >= 2, method.temperature and method.sharpen > 0")
        if m.prior_exponent < 0:
            raise ConfigError(f"method.prior_exponent={m.prior_exponent} must be >= 0")
        if cfg.optim.ipe_scale < 1:
            raise ConfigError(f"optim.ipe_scale={cfg.optim.ipe_scale} must be >= 1 (the EMA momentum would pass 1)")
        if cfg.optim.clip_grad:
            raise ConfigError("MSN clips encoder + head only: set method.clip_grad, not optim.clip_grad")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        m, mc = cfg.method, cfg.model
        self.rand_size = m.rand_size or self.image_size
        self.encoder = vit_from_config(mc, self.data_info.in_chans, self.rand_size, rescale_init=False,
                                       interpolate_offset=0.0, interpolate_float32=False)
        self.head = ProjectionHead(mc.embed_dim, m.hidden_dim, m.output_dim, use_bn=m.use_bn, activation="gelu")
        redraw_linear_(self.encoder, self.head)             # official init_model
        nn.init.kaiming_normal_(self.encoder.patch_embed.proj.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        bound = (1.0 / m.output_dim) ** 0.5
        self.prototypes = nn.Parameter(torch.empty(m.num_prototypes, m.output_dim).uniform_(-bound, bound),
                                       requires_grad=not m.freeze_prototypes)
        self.target_encoder = make_target(self.encoder)
        self.target_head = make_target(self.head)
        k = m.num_prototypes
        off = m.label_smoothing / k
        labels = torch.full((k, k), off).fill_diagonal_(1.0 - m.label_smoothing + off)
        self.register_buffer("proto_labels", labels, persistent=False)
        # float64 (cast where used): a float32 prior would be off by ~1e-8 in a float64 model
        prior = power_law_prior(k, m.prior_exponent, dtype=torch.float64) if m.prior == "power_law" else None
        self.register_buffer("prior", prior, persistent=False)
        gs = self.rand_size // mc.patch_size
        self.num_patches, self.keep = gs * gs, num_kept(gs * gs, m.patch_drop) if m.patch_drop else 0
        s = m.color_jitter
        self.spec = PhotometricSpec(jitter_p=m.jitter_p, grayscale_p=m.grayscale_p, blur_p=m.blur_p,
                                    brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=min(0.5, 0.2 * s))

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """The target and anchor views (``rand_crop_scale``) and the focal views, from the full image."""
        m = self.cfg
        crops = {"rand": CropSpec(self.rand_size, 1 + m.rand_views, tuple(m.rand_crop_scale), hflip=m.hflip)}
        if m.focal_views:
            crops["focal"] = CropSpec(m.focal_size, m.focal_views, tuple(m.focal_crop_scale), hflip=m.hflip)
        return {"main": StreamSpec(crops=crops)}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        crops = take_crops(batch, self.streams()["main"].crops, generator, as_float=False)
        views = {k: photometric_views(v, self.spec, self.normalize, generator) for k, v in crops.items()}
        out = {k: v for k, v in batch.items() if k not in ("image", "crops")}
        out.update(target=views["rand"][:, 0], anchors=views["rand"][:, 1:])
        if "focal" in views:
            out["focal"] = views["focal"]
        if self.keep:  # one permutation for the whole batch (official), stored per sample
            B, device = out["target"].shape[0], out["target"].device
            perm = torch.randperm(self.num_patches, generator=generator)[:self.keep]
            out["idx_keep"] = perm.to(device).expand(B, -1).contiguous()
        return out

    # -- training --------------------------------------------------------------------------------
    def sharpen_at(self, step: Step) -> float:
        t0, t1 = self.cfg.sharpen
        return linear_momentum(step.step, max(1, step.total_steps), t0, t1) if t0 != t1 else t0

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        m = self.cfg

        def view_major(x: Tensor) -> list[Tensor]:
            return list(x.transpose(0, 1).unbind(0))

        views = view_major(batch["anchors"]) + (view_major(batch["focal"]) if "focal" in batch else [])
        with torch.no_grad():
            h = self.target_head(self.target_encoder(batch["target"])[:, 0])
        z = encode_views(self.encoder, views, batch.get("idx_keep"), self.head)
        with fp32_loss(z, h) as (z, h):  # official: trains in float32; here the backbone may run in autocast
            out = msn_loss(z, h, self.prototypes, tau=m.temperature, T=self.sharpen_at(step),
                           proto_labels=self.proto_labels, me_max_weight=m.me_max_weight,
                           entropy_weight=m.entropy_weight, use_sinkhorn=m.use_sinkhorn,
                           sinkhorn_iters=m.sinkhorn_iters, prior=self.prior, kl_direction=m.kl_direction,
                           sinkhorn_prior=m.sinkhorn_follows_prior)
        self.record_health(embeddings=z, target_probs=out["targets"])
        return {k: out[k] for k in ("loss", "ce", "me_max", "entropy", "np", "max_t", "min_t")}

    def before_optimizer_step(self, step: Step) -> None:
        self.head.zero_redundant_bias_grads_()
        g = self.prototypes.grad
        if g is not None and self.cfg.proto_grad_reduce == "sum":
            g.mul_(D.world_in(None))     # DDP averaged it: the official AllReduceSum is W x the mean
        if self.cfg.clip_grad:
            params = [p for p in (*self.encoder.parameters(), *self.head.parameters()) if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad, foreach=True)

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        m0, m1 = self.cfg.ema
        momentum = min(m1, linear_momentum(step.step, max(1, step.total_steps), m0, m1))
        # official: the EMA runs over parameters only; the target's BN statistics are its own (updated
        # by its train-mode forward on the target view), so keep them instead of ema_update_'s copy
        own = [(b, b.clone()) for b in (*self.target_encoder.buffers(), *self.target_head.buffers())]
        ema_update_(self.target_encoder, self.encoder, momentum)
        ema_update_(self.target_head, self.head, momentum)
        for b, value in own:
            b.copy_(value)

    def param_groups(self) -> list[dict]:
        groups = decay_groups(self.encoder, self.head, no_decay=no_decay_bias_bn)
        if self.prototypes.requires_grad:
            groups.append({"params": [self.prototypes], "weight_decay": 0.0, "wd_exclude": True})
        return groups

    # -- evaluation and export -------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        return self.target_encoder

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        x = self.normalize(images)
        if x.shape[-1] != self.rand_size:
            x = torch.nn.functional.interpolate(x, size=(self.rand_size, self.rand_size), mode="bilinear",
                                                align_corners=False, antialias=True)
        (_, cls), = self.target_encoder.get_intermediate_layers(x, n=1, return_class_token=True,
                                                                norm=self.cfg.feature_norm)
        return cls

    def export_modules(self) -> dict[str, Export]:
        # official: src/deit.py keys; with heads, the checkpoint entry with the head as ``fc`` + prototypes
        heads = {"target_encoder": "target_head", "encoder": "head"}
        return {name: Export(getattr(self, name), {**module_metadata(getattr(self, name)), **declare(
                    official={"layout": "msn", "entry": name,
                              "parts": {"head": heads[name], "prototypes": "prototypes"}}, timm="vit")})
                for name in ("target_encoder", "encoder")}
