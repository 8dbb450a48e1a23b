"""The JEPA family: a context encoder and a predictor regress an EMA target encoder's representations.

    masks_enc, masks_pred = sample_masks(B)            # context / target blocks on the patch grid
    h = LN(target_encoder(target view))[masks_pred]    # no gradient
    z = predictor(encoder(view[masks_enc]), masks_enc, masks_pred, **predictor_options)
    loss = smooth_l1(z, h); AdamW; target_encoder <- EMA(encoder)

I-JEPA (:mod:`~visrep.methods.ijepa`) is the family as it is; StoP adds noise to the target positions
(``predictor_options`` / ``loss_options``), IWM feeds photometric views and the transformation to the
predictor. :func:`ijepa_loss` is the shared objective, :class:`JEPA` the shared method; its
``predictor_ft`` protocol fine-tunes the predictor over frozen tokens (IWM paper, section 5).
Where I-JEPA's official code and paper differ: :mod:`visrep.methods.ijepa`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visrep.data.crops import CropSpec, take_crops
from visrep.data.masks import MultiBlockMaskCollator
from visrep.data.transforms import batch_resize_center_crop
from visrep.errors import ConfigError
from visrep.eval.finetune import AttentivePooler, train_classifier
from visrep.eval.protocols import Protocol
from visrep.formats import declare
from visrep.losses import fp32_loss, jepa_loss, normalized_targets
from visrep.models import Predictor, apply_masks, repeat_interleave_batch, vit_from_config
from visrep.models.vit import redraw_linear_
from visrep.optim.ema import ema_update_, make_target
from visrep.optim.groups import decay_groups, no_decay_official_jepa
from visrep.optim.schedules import linear_momentum

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata


@dataclass
class JEPAConfig:
    """The family's settings (defaults: official I-JEPA); each member's config extends it."""

    name: str = "ijepa"
    pred_depth: int = 6
    pred_emb_dim: int = 384
    pred_num_heads: int | None = None       # None: the encoder's head count (official)
    ema: tuple[float, float] = (0.996, 1.0)
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    num_enc_masks: int = 1
    num_pred_masks: int = 4
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)
    min_keep: int = 10
    allow_overlap: bool = False
    mask_mode: Literal["default", "official"] = "default"
    context: Literal["block", "complement"] = "block"   # I-JEPA: a context block; complement: all but targets
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip: bool = False
    rescale_init: bool = False                 # official: False (Linear layers re-drawn, see above)


def ijepa_loss(encoder, target_encoder, predictor, imgs: Tensor, masks_enc: list[Tensor],
               masks_pred: list[Tensor], kind: str = "smooth_l1", *, target_blocks: int = 1,
               pairing: str = "blocks", noise: list[Tensor] | None = None, cond: Tensor | None = None,
               target_imgs: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The I-JEPA objective for one batch: returns (loss, predictions z, targets h).

    Shared by StoP: ``target_blocks=K`` averages the final-normed outputs of the target encoder's
    last K blocks before the non-affine LN (StoP ``meta.target_blocks``; 1 = I-JEPA); ``noise`` goes
    to the predictor. ``pairing`` orders the target rows when there are several context masks:
    ``"blocks"`` (I-JEPA ``repeat_interleave_batch``, rows (target, context, sample) like the
    predictions) or ``"rows"`` (StoP's ``torch.repeat_interleave``, rows (target, sample, context):
    with more than one context mask and batch > 1 predictions meet other samples' targets, as the
    official StoP code does; identical for one context mask, the released configs).

    Shared by IWM: ``target_imgs`` (the target view y; default ``imgs``) goes through the target
    encoder while the encoder sees ``imgs`` (the source view x); ``cond`` [B, P] conditions the
    predictor on the transformation x -> y."""
    target_imgs = imgs if target_imgs is None else target_imgs
    with torch.no_grad():
        if target_blocks == 1:
            h = target_encoder(target_imgs)[:, target_encoder.num_prefix:]
        else:
            with fp32_loss(*target_encoder.get_intermediate_layers(target_imgs, n=target_blocks)) as blocks:
                h = torch.stack(blocks).mean(0)      # the targets in float32 (I-JEPA: LN on autocast's fp32 list)
        h = apply_masks(normalized_targets(h), masks_pred)
        if pairing == "blocks":
            h = repeat_interleave_batch(h, imgs.size(0), repeat=len(masks_enc))
        elif pairing == "rows":
            h = h.repeat_interleave(len(masks_enc), dim=0)
        else:
            raise ValueError(f"pairing must be 'blocks' or 'rows', got {pairing!r}")
    extra = {k: v for k, v in (("noise", noise), ("cond", cond)) if v is not None}
    z = predictor(encoder(imgs, idx_keep=masks_enc), masks_enc, masks_pred, **extra)
    return jepa_loss(z, h, kind), z, h


class _PredictorClassifier(nn.Module):
    """Frozen-encoder tokens ``[B, N, D]`` -> (predictor over every position, null action) -> head."""

    def __init__(self, predictor: Predictor | None, head: nn.Module):
        super().__init__()
        self.predictor, self.head = predictor, head

    def forward(self, tokens: Tensor) -> Tensor:
        if self.predictor is not None:
            b, n = tokens.shape[:2]
            every = torch.arange(n, device=tokens.device).expand(b, n)
            p = self.predictor
            cond = tokens.new_zeros(b, p.cond_dim) if p.conditioning != "none" else None
            tokens = p(tokens, [every], [every], cond=cond)
        return self.head(tokens)


class JEPA(Method):
    """The family's method: I-JEPA's step; members override the hooks named in the module docstring."""

    feature_description = "average-pooled last-layer tokens of the target encoder"

    @classmethod
    def validate(cls, cfg) -> None:
        mc, m = cfg.model, cfg.method
        if mc.class_token or mc.num_registers:
            raise ConfigError("I-JEPA predicts patch tokens only: model.class_token must be false and "
                              "model.num_registers 0")
        for key, dim, heads in (("model.embed_dim", mc.embed_dim, mc.num_heads),
                                ("method.pred_emb_dim", m.pred_emb_dim, m.pred_num_heads or mc.num_heads)):
            if dim % heads:
                raise ConfigError(f"{key}={dim} must be divisible by the number of heads ({heads})")
            if mc.pos_embed == "sincos" and dim % 4:
                raise ConfigError(f"{key}={dim} must be divisible by 4 for sin-cos position embeddings")
        check_vit_config(cfg)
        if cfg.optim.ipe_scale < 1:
            raise ConfigError(f"optim.ipe_scale={cfg.optim.ipe_scale} must be >= 1 (the EMA momentum would pass 1)")
        try:  # the mask generator checks the grid against the block sizes
            MultiBlockMaskCollator(input_size=cfg.data.image_size, patch_size=mc.patch_size,
                                   enc_mask_scale=m.enc_mask_scale, pred_mask_scale=m.pred_mask_scale,
                                   aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks, npred=m.num_pred_masks,
                                   min_keep=m.min_keep, allow_overlap=m.allow_overlap, mode=m.mask_mode,
                                   context=m.context)
        except ValueError as e:
            raise ConfigError(f"method (masks): {e}") from None

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        m, mc = cfg.method, cfg.model
        self.encoder = vit_from_config(mc, self.data_info.in_chans, self.image_size, rescale_init=m.rescale_init)
        self.predictor = self.build_predictor(mc.embed_dim, mc.num_heads, redraw=False)
        if not m.rescale_init:
            redraw_linear_(self.encoder, self.predictor)
        self.target_encoder = make_target(self.encoder)
        self.mask_collator = MultiBlockMaskCollator(
            input_size=self.image_size, patch_size=mc.patch_size, enc_mask_scale=m.enc_mask_scale,
            pred_mask_scale=m.pred_mask_scale, aspect_ratio=m.aspect_ratio, nenc=m.num_enc_masks,
            npred=m.num_pred_masks, min_keep=m.min_keep, allow_overlap=m.allow_overlap, mode=m.mask_mode,
            context=m.context)

    def build_predictor(self, embed_dim: int, num_heads: int, redraw: bool = True) -> Predictor:
        """A freshly initialised predictor (with ``redraw``: the official init unless ``rescale_init``)."""
        m = self.cfg
        predictor = Predictor(
            num_patches=self.encoder.grid, embed_dim=embed_dim, predictor_embed_dim=m.pred_emb_dim,
            depth=m.pred_depth, num_heads=m.pred_num_heads or num_heads, mlp_ratio=4.0,
            rescale_init=m.rescale_init, **self.predictor_options())
        if redraw and not m.rescale_init:
            redraw_linear_(predictor)
        predictor.grad_checkpointing = self.encoder.grad_checkpointing
        return predictor

    def predictor_options(self) -> dict:
        """Extra ``Predictor`` arguments (StoP: stochastic positions)."""
        return {}

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """One RandomResizedCrop of the full image (official: ``RandomResizedCrop(crop_scale)``)."""
        return {"main": StreamSpec(crops={"image": CropSpec(self.image_size, 1, tuple(self.cfg.crop_scale),
                                                            hflip=self.cfg.hflip)})}

    def crop(self, batch: dict, generator: torch.Generator, as_float: bool = True) -> Tensor:
        """The batch's crops, float [0, 1] ``[B, C, S, S]`` (``as_float=False``: the workers' stay uint8)."""
        return take_crops(batch, self.streams()["main"].crops, generator, as_float=as_float)["image"][:, 0]

    def augment(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Batch augmentation after the crop, on uint8 (the workers') or float [0, 1] images; either may
        come out, ``normalize`` takes both (I-JEPA: none)."""
        return images

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images = self.normalize(self.augment(self.crop(batch, generator, as_float=False), generator))
        masks_enc, masks_pred = self.sample_masks(images.size(0), generator)
        return {**batch, "image": images, "masks_enc": masks_enc, "masks_pred": masks_pred}

    def sample_masks(self, batch_size: int, generator: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
        """Context and target masks for one batch, a pure function of ``generator``'s state."""
        # The collator draws block sizes from its step counter and positions from the global RNG:
        # seed both from ``generator`` so that each step's masks are a pure function of the step.
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        self.mask_collator.set_step(seed)
        with torch.random.fork_rng(devices=[]):  # CPU generator only; CUDA RNG streams stay untouched
            torch.default_generator.manual_seed(seed)
            return self.mask_collator.sample(batch_size)

    # -- training --------------------------------------------------------------------------------
    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        device = self.normalize.mean.device
        imgs = batch["image"].to(device, non_blocking=True)
        if imgs.dtype == torch.uint8:
            imgs = self.normalize(imgs)
        masks_enc = [m.to(device, non_blocking=True) for m in batch["masks_enc"]]
        masks_pred = [m.to(device, non_blocking=True) for m in batch["masks_pred"]]
        loss, z, h = ijepa_loss(self.encoder, self.target_encoder, self.predictor, imgs, masks_enc,
                                masks_pred, self.cfg.loss, **self.loss_options(batch, imgs))
        self.record_health(embeddings=z, target_repr=h)
        return {"loss": loss}

    def loss_options(self, batch: dict, imgs: Tensor) -> dict:
        """Extra ``ijepa_loss`` arguments for this batch (StoP: noise, K, pairing; IWM: views, action)."""
        return {}

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        m0, m1 = self.cfg.ema
        momentum = min(m1, linear_momentum(step.step, max(1, step.total_steps), m0, m1))
        ema_update_(self.target_encoder, self.encoder, momentum)

    def param_groups(self) -> list[dict]:
        return decay_groups(self.encoder, self.predictor, no_decay=no_decay_official_jepa)

    # -- evaluation and export -------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        return self.target_encoder

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.target_encoder.pooled(self.normalize(images), pool="avg")

    @torch.no_grad()
    def frozen_tokens(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """The target encoder's last-layer tokens ``[N, T, D]`` of centre-cropped uint8 ``images``."""
        device = self.normalize.mean.device
        was_training = self.target_encoder.training
        self.target_encoder.eval()
        out = [self.target_encoder(self.normalize(batch_resize_center_crop(chunk.to(device), self.image_size))).cpu()
               for chunk in images.split(batch_size)]
        self.target_encoder.train(was_training)
        return torch.cat(out)

    @classmethod
    def protocols(cls) -> dict[str, Protocol]:
        return {"predictor_ft": Protocol("top-1 with the encoder frozen, predictor + attentive head fine-tuned",
                                         cls._predictor_ft_protocol)}

    def _predictor_ft_protocol(self, ctx) -> dict[str, float]:
        e = ctx.cfg.eval
        x, y, keep = ctx.finetune_set(self)
        _, images, labels = ctx.split("test")
        return self.predictor_finetune((x[keep], y[keep]), (images, labels), epochs=e.finetune_epochs,
                                       lr=e.finetune_lr, generator=ctx.generator)

    def predictor_finetune(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], epochs: int = 10,
                           lr: float = 1e-3, batch_size: int = 128, generator: torch.Generator | None = None
                           ) -> dict[str, float]:
        """Leveraging the world model (IWM paper, section 5): the encoder frozen, the pretrained
        predictor reads the target encoder's tokens of the whole image with a null action (no
        transformation; StoP: deterministic positions) and predicts every position, and an attentive
        head classifies its outputs; predictor and head are trained with AdamW, the pretrained predictor
        at ``lr / 10`` as in the paper. Two references in the same run: a randomly initialised predictor
        (at ``lr``) and the attentive probe on the encoder tokens alone. Returns top-1 (%) of each."""
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        device = self.normalize.mean.device
        tokens_tr, tokens_te = self.frozen_tokens(train[0]), self.frozen_tokens(test[0])
        dim, classes = tokens_tr.shape[-1], int(max(train[1].max(), test[1].max())) + 1
        heads = self.encoder.num_heads
        results = {}
        for name, predictor, pred_lr in (("pretrained predictor", copy.deepcopy(self.predictor), lr / 10),
                                         ("random predictor", self.build_predictor(dim, heads).to(device), lr),
                                         ("attentive probe", None, 0.0)):
            head = AttentivePooler(dim, classes, num_heads=heads)
            model = _PredictorClassifier(predictor, head)
            groups = [{"params": list(head.parameters()), "lr": lr}]
            if predictor is not None:
                groups.append({"params": list(predictor.parameters()), "lr": pred_lr})
            out = train_classifier(model, groups, (tokens_tr, train[1]), (tokens_te, test[1]), epochs=epochs,
                                   batch_size=batch_size, generator=torch.Generator().manual_seed(int(
                                       torch.randint(0, 2**31 - 1, (1,), generator=g))),
                                   device=device, desc=f"predictor fine-tune ({name})", eval_mode=True)
            results[name] = out["top1"]
        return results

    def export_modules(self) -> dict[str, Export]:
        # the official I-JEPA / StoP layouts are ours; a conditioned (IWM) predictor has no official code
        official = "vit" if self.predictor.arch.get("conditioning", "none") == "none" else None
        return {name: Export(getattr(self, name), {**module_metadata(getattr(self, name)), **declare(
                    official=official, timm="vit" if name != "predictor" else None)})
                for name in ("target_encoder", "encoder", "predictor")}
