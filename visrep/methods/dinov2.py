"""DINOv2: self-distillation with a DINO [CLS] loss, an iBOT masked-patch loss and KoLeo.

Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", TMLR 2024; official
code facebookresearch/dinov2 @ b8931f7 (``dinov2/train/ssl_meta_arch.py``, ``train/train.py``).

    g, l = 2 global crops (iBOT masks on half of them), n_local local crops
    with no_grad: t_cls, t_patch = targets (centering or Sinkhorn) of EMA teacher(g), crops A <-> B
    s_g = student(g, mask=masks); s_l = student(l)
    loss = DINO CE over (student crop, teacher crop) pairs / (2 + 2 n_local)
         + 0.1 * KoLeo(s_g [CLS]) + 1.0 * iBOT CE at masked patches
    AdamW (lr x sqrt(batch / 1024), layer decay, grad clip 3.0); teacher <- EMA (0.992 -> 1)

Differences from the official code: blur as its code executes it (``blur=paper``: the paper's), KoLeo
over every process (``koleo_scope=local``: official), centres over every process's rows, sqrt scaling
of the whole lr schedule. Specification, FSDP and distillation notes: docs/methods/dinov2.md
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from visrep.checkpoint import load_checkpoint
from visrep.data.crops import CropSpec, take_crops
from visrep.data.masks import IBOTMaskGenerator
from visrep.data.views import PhotometricSpec, photometric_views
from visrep.errors import CheckpointError, ConfigError
from visrep.eval.features import SweptInput, linear_input, linear_input_columns
from visrep.formats import declare
from visrep.losses.dino import Centering, dino_loss, ibot_loss, ibot_mask_weights, koleo_loss, sinkhorn_teacher
from visrep.losses.precision import fp32_loss
from visrep.models import vit_from_config
from visrep.models.heads import DINOHead
from visrep.optim.ema import ema_update_, make_target
from visrep.optim.groups import vit_lr_decay_rate
from visrep.optim.schedules import cosine_momentum, cosine_schedule

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata


@dataclass
class DINOv2Config:
    name: Literal["dinov2"] = "dinov2"
    # crops (global crops: data.image_size)
    n_local_crops: int = 8
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] = (0.32, 1.0)
    local_crop_scale: tuple[float, float] = (0.05, 0.32)
    hflip: bool = True
    blur: Literal["code", "paper", "none"] = "code"
    blur_kernel_size: int = 9
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # heads
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_hidden_dim: int = 2048
    head_nlayers: int = 3
    ibot_separate_head: bool = False
    ibot_n_prototypes: int = 65536
    ibot_bottleneck_dim: int = 256
    ibot_hidden_dim: int = 2048
    ibot_nlayers: int = 3
    # losses
    dino_loss_weight: float = 1.0
    ibot_loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    koleo_scope: Literal["global", "local"] = "global"
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    mask_max_patches: float | None = None   # None: the official train.py expression floor(g/2)*g
    centering: Literal["centering", "sinkhorn_knopp"] = "centering"
    center_momentum: float = 0.9
    sinkhorn_iters: int = 3
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    momentum_teacher: tuple[float, float] = (0.992, 1.0)
    # optimisation
    epoch_length: int = 1250                # iterations per "epoch" of the two schedules below (official)
    freeze_last_layer_epochs: float = 1.0
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float | None = 3.0           # per student module (backbone, heads), as the official code
    drop_path_uniform: bool = True
    drop_path_mode: Literal["batch_subset", "per_sample"] = "batch_subset"  # official training (crop lists,
    # NestedTensorBlock.forward_nested): the batch subset for any rate above 0
    # distillation
    teacher_checkpoint: str | None = None   # a visrep DINOv2 checkpoint: frozen teacher, EMA student evaluated


def build_heads(cfg: DINOv2Config, embed_dim: int) -> dict[str, nn.Module]:
    heads = {"dino_head": DINOHead(embed_dim, cfg.head_n_prototypes, cfg.head_nlayers, cfg.head_hidden_dim,
                                   cfg.head_bottleneck_dim)}
    if cfg.ibot_separate_head:
        heads["ibot_head"] = DINOHead(embed_dim, cfg.ibot_n_prototypes, cfg.ibot_nlayers, cfg.ibot_hidden_dim,
                                      cfg.ibot_bottleneck_dim)
    return heads


def official_init_(backbone: nn.Module) -> None:
    """DINOv2's token / patch-embedding init on top of our ViT's (Linear trunc_normal 0.02, bias 0):
    cls and register tokens N(0, 1e-6), mask token 0, patch-embedding Conv2d PyTorch's default."""
    if backbone.cls_token is not None:
        nn.init.normal_(backbone.cls_token, std=1e-6)
    if backbone.register_tokens is not None:
        nn.init.normal_(backbone.register_tokens, std=1e-6)
    if backbone.mask_token is not None:
        nn.init.zeros_(backbone.mask_token)
    backbone.patch_embed.proj.reset_parameters()


class DINOv2(Method):
    feature_description = "DINOv2 probe features: the teacher backbone's final-normed [CLS] token"

    @classmethod
    def validate(cls, cfg) -> None:
        m = cfg.method
        check_vit_config(cfg, {"data.image_size": cfg.data.image_size, "method.local_crop_size": m.local_crop_size},
                         class_token="DINOv2's losses read the [CLS] token")
        if m.n_local_crops < 0:
            raise ConfigError(f"method.n_local_crops={m.n_local_crops} must be >= 0")
        if not 0 <= m.mask_ratio[0] <= m.mask_ratio[1] <= 1:
            raise ConfigError(f"method.mask_ratio={m.mask_ratio} must satisfy 0 <= min <= max <= 1")
        if not 0 <= m.mask_probability <= 1:
            raise ConfigError(f"method.mask_probability={m.mask_probability} must be in [0, 1]")
        if m.epoch_length < 1:
            raise ConfigError(f"method.epoch_length={m.epoch_length} must be >= 1")
        if m.centering == "sinkhorn_knopp" and m.sinkhorn_iters < 1:
            raise ConfigError(f"method.sinkhorn_iters={m.sinkhorn_iters} must be >= 1")
        if not cfg.eval.probe_blocks or not cfg.eval.probe_avgpool:
            raise ConfigError("eval.probe_blocks and eval.probe_avgpool must each name at least one value "
                              f"(got {cfg.eval.probe_blocks} and {cfg.eval.probe_avgpool})")
        if m.teacher_checkpoint is not None and not Path(m.teacher_checkpoint).is_file():
            raise ConfigError(f"method.teacher_checkpoint: file not found: {m.teacher_checkpoint}")
        if m.ibot_loss_weight > 0 and not m.ibot_separate_head and m.head_n_prototypes < 1:
            raise ConfigError("method.head_n_prototypes must be >= 1")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        m, mc = cfg.method, cfg.model
        self.do_ibot = m.ibot_loss_weight > 0
        backbone = vit_from_config(mc, self.data_info.in_chans, self.image_size, mask_token=True, rescale_init=False,
                                   drop_path_uniform=m.drop_path_uniform, drop_path_mode=m.drop_path_mode)
        official_init_(backbone)
        self.student = nn.ModuleDict({"backbone": backbone, **build_heads(m, mc.embed_dim)})
        self.distill = m.teacher_checkpoint is not None
        if self.distill:
            self.feature_description = "DINOv2 distillation: the student EMA backbone's final-normed [CLS] token"
            self.teacher = load_teacher(m.teacher_checkpoint, self.data_info)
            self.student_ema = make_target(self.student)
            if self.teacher["dino_head"].arch["out_dim"] != m.head_n_prototypes:
                raise ValueError(f"the teacher's DINO head has {self.teacher['dino_head'].arch['out_dim']} prototypes, "
                                 f"method.head_n_prototypes={m.head_n_prototypes}")
        else:
            self.teacher = make_target(self.student)
        for module in (self.teacher, getattr(self, "student_ema", None)):
            if module is not None:
                module["backbone"].disable_drop_path()
        k_dino = self.teacher["dino_head"].arch["out_dim"]
        k_ibot = self.teacher["ibot_head"].arch["out_dim"] if "ibot_head" in self.teacher else k_dino
        if self.distill:
            s_ibot = self.student["ibot_head" if "ibot_head" in self.student else "dino_head"].arch["out_dim"]
            if self.do_ibot and (s_ibot != k_ibot or tuple(self.teacher["backbone"].grid) != tuple(backbone.grid)):
                raise ValueError("distillation with iBOT needs the teacher's patch grid and iBOT prototypes "
                                 f"(grid {tuple(self.teacher['backbone'].grid)}, {k_ibot} prototypes); the student "
                                 f"has grid {tuple(backbone.grid)}, {s_ibot} prototypes")
        self.dino_center = Centering(k_dino, m.center_momentum)
        self.ibot_center = Centering(k_ibot, m.center_momentum)
        grid = backbone.grid
        self.mask_generator = IBOTMaskGenerator(tuple(grid), m.mask_ratio, m.mask_probability, m.mask_max_patches)
        self.global_specs, self.local_spec = self._photometric_specs()

    def _photometric_specs(self) -> tuple[tuple[PhotometricSpec, PhotometricSpec], PhotometricSpec]:
        m = self.cfg
        blur = {"code": (0.0, 0.9, 0.5), "paper": (1.0, 0.1, 0.5), "none": (0.0, 0.0, 0.0)}[m.blur]
        common = dict(jitter_p=m.color_jitter_p, grayscale_p=m.grayscale_p, brightness=0.4, contrast=0.4,
                      saturation=0.2, hue=0.1, blur_sigma=(0.1, 2.0), blur_kernel_size=m.blur_kernel_size,
                      solarize_threshold=128 / 255)
        g1 = PhotometricSpec(blur_p=blur[0], **common)
        g2 = PhotometricSpec(blur_p=blur[1], solarize_p=0.2, **common)
        return (g1, g2), PhotometricSpec(blur_p=blur[2], **common)

    # -- data ------------------------------------------------------------------------------------
    def streams(self) -> dict[str, StreamSpec]:
        """2 global crops (``global_crop_scale``) and ``n_local_crops`` local ones, from the full image."""
        m = self.cfg
        crops = {"global_crops": CropSpec(self.image_size, 2, tuple(m.global_crop_scale), hflip=m.hflip)}
        if m.n_local_crops:
            crops["local_crops"] = CropSpec(m.local_crop_size, m.n_local_crops, tuple(m.local_crop_scale),
                                            hflip=m.hflip)
        return {"main": StreamSpec(crops=crops)}

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Global crops ``[B, 2, C, S, S]`` (each with its own photometric spec), local crops ``[B, n_local,
        C, s, s]`` and iBOT masks ``[B, 2, N]`` (sample-major, so any split of the batch keeps each sample's
        views)."""
        crops = take_crops(batch, self.streams()["main"].crops, generator, as_float=False)
        out = {k: v for k, v in batch.items() if k not in ("image", "crops")}
        glob = torch.stack([photometric_views(crops["global_crops"][:, i:i + 1], spec, self.normalize, generator)[:, 0]
                            for i, spec in enumerate(self.global_specs)], dim=1)
        out["global_crops"] = glob
        if "local_crops" in crops:
            out["local_crops"] = photometric_views(crops["local_crops"], self.local_spec, self.normalize, generator)
        B = glob.shape[0]
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        # the official collate masks the global crops whether or not the iBOT loss is on
        masks = self.mask_generator.sample(2 * B, rng)["masks"]
        out["masks"] = masks.view(2, B, -1).transpose(0, 1).to(glob.device)
        return out

    # -- training --------------------------------------------------------------------------------
    def teacher_temp(self, step: int) -> float:
        m = self.cfg
        warm = int(m.warmup_teacher_temp_epochs * m.epoch_length)
        return cosine_schedule(step, warm, m.teacher_temp, m.teacher_temp, warmup=warm,
                               start_warmup=m.warmup_teacher_temp)

    @torch.no_grad()
    def teacher_targets(self, glob: Tensor, idx: Tensor, temp: float) -> tuple[Tensor, Tensor | None]:
        """Teacher targets for the (swapped) global-crop [CLS] tokens and the masked patches."""
        m, t = self.cfg, self.teacher
        out = t["backbone"].forward_features(glob)
        cls = torch.cat(out["x_norm_clstoken"].chunk(2)[::-1])           # crop A <-> crop B
        patches = out["x_norm_patchtokens"].flatten(0, 1)[idx] if self.do_ibot else None
        if patches is None:
            t_cls, t_patch = t["dino_head"](cls), None
        elif "ibot_head" in t:
            t_cls, t_patch = t["dino_head"](cls), t["ibot_head"](patches)
        else:
            t_cls, t_patch = t["dino_head"](torch.cat([cls, patches])).split([cls.shape[0], patches.shape[0]])
        if m.centering == "sinkhorn_knopp":
            # float32 targets (float64 stays float64), as the official sinkhorn_knopp_teacher
            p_cls = sinkhorn_teacher(t_cls, temp, m.sinkhorn_iters)
            p_patch = None if t_patch is None else sinkhorn_teacher(t_patch, temp, m.sinkhorn_iters)
            return p_cls, p_patch
        p_cls = self.dino_center.softmax(t_cls, temp)
        self.dino_center.update(t_cls)
        p_patch = None
        if t_patch is not None:
            p_patch = self.ibot_center.softmax(t_patch, temp)
            self.ibot_center.update(t_patch)
        return p_cls, p_patch

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        m, s = self.cfg, self.student
        glob = batch["global_crops"].transpose(0, 1).flatten(0, 1)         # crop-major [2B, C, H, W]
        masks = batch["masks"].transpose(0, 1).flatten(0, 1)               # [2B, N]
        idx = masks.flatten().nonzero().flatten()
        n_local = m.n_local_crops
        p_cls, p_patch = self.teacher_targets(glob, idx, self.teacher_temp(step.step))

        out_g = s["backbone"].forward_features(glob, mask=masks)                # masked even without iBOT
        cls_g = out_g["x_norm_clstoken"]
        inputs = [cls_g]
        if n_local:
            loc = batch["local_crops"].transpose(0, 1).flatten(0, 1)
            inputs.insert(0, s["backbone"].forward_features(loc)["x_norm_clstoken"])
        patches = out_g["x_norm_patchtokens"].flatten(0, 1)[idx] if self.do_ibot else None
        shared = self.do_ibot and "ibot_head" not in s
        if shared:
            inputs.append(patches)
        logits = list(s["dino_head"](torch.cat(inputs)).split([x.shape[0] for x in inputs]))
        s_patch = logits.pop() if shared else (s["ibot_head"](patches) if self.do_ibot else None)
        s_cls_g = logits.pop()
        s_cls_l = logits.pop() if n_local else None

        terms = (2 - 1) * 2 + max(n_local * 2, 1)
        losses: dict[str, Tensor] = {}
        # the losses in float32 (official: float32 targets and CE inputs, KoLeo with autocast off)
        with fp32_loss(cls_g, s_cls_g, s_cls_l, s_patch) as (cls_g, s_cls_g, s_cls_l, s_patch):
            total = cls_g.new_zeros(())
            if m.dino_loss_weight > 0:
                losses["dino_global_crops_loss"] = dino_loss(s_cls_g, p_cls, m.student_temp) * 2 / terms
                total = total + m.dino_loss_weight * losses["dino_global_crops_loss"]
                if n_local:
                    local = dino_loss(s_cls_l.chunk(n_local), p_cls.chunk(2), m.student_temp)
                    losses["dino_local_crops_loss"] = local / terms
                    total = total + m.dino_loss_weight * losses["dino_local_crops_loss"]
            if m.koleo_loss_weight > 0:
                group = None if m.koleo_scope == "global" else False
                losses["koleo_loss"] = m.koleo_loss_weight * sum(koleo_loss(c, group=group) for c in cls_g.chunk(2))
                total = total + losses["koleo_loss"]
            if self.do_ibot:
                weights = ibot_mask_weights(masks).to(s_patch.dtype)
                losses["ibot_loss"] = ibot_loss(s_patch, p_patch, masks, m.student_temp, weights=weights)
                total = total + m.ibot_loss_weight * losses["ibot_loss"]
        self.record_health(embeddings=cls_g, target_probs=p_cls)
        return {"loss": total, **{k: v.detach() for k, v in losses.items()}}

    def param_groups(self) -> list[dict]:
        """Official ``get_params_groups_with_decay`` per student module: layer-wise lr decay on the
        backbone, patch embedding x ``patch_embed_lr_mult``, no weight decay on biases, norms and
        LayerScale gammas, the heads' last layers frozen for ``freeze_last_layer_epochs``; every lr
        (The sqrt batch scaling is the engine's: ``optim.lr_batch_ref=1024 optim.lr_batch_scaling=sqrt``.)"""
        m = self.cfg
        freeze = int(m.freeze_last_layer_epochs * m.epoch_length)
        groups: dict[tuple, list] = {}
        depth = len(self.student["backbone"].blocks)
        for module_name, module in self.student.items():
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                lr = vit_lr_decay_rate(name, m.layerwise_decay, depth) if module_name == "backbone" else 1.0
                if "patch_embed" in name:
                    lr *= m.patch_embed_lr_mult
                no_wd = name.endswith(".bias") or "norm" in name or "gamma" in name
                groups.setdefault((lr, no_wd, "last_layer" in name), []).append(p)
        out = []
        for (lr, no_wd, last), params in groups.items():
            g = {"params": params, "lr_scale": lr, "freeze_until": freeze if last else 0}
            if no_wd:
                g.update(weight_decay=0.0, wd_exclude=True)
            out.append(g)
        return out

    def before_optimizer_step(self, step: Step) -> None:
        if self.cfg.clip_grad:
            for module in self.student.values():
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.cfg.clip_grad, foreach=True)

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        momentum = cosine_momentum(step.step, max(1, step.total_steps), *self.cfg.momentum_teacher)
        ema_update_(self.student_ema if self.distill else self.teacher, self.student, momentum)

    def ddp_options(self) -> dict:
        # a separate iBOT head is unused when no crop of a process's batch is masked
        return {"find_unused_parameters": True} if self.cfg.ibot_separate_head and self.do_ibot else {}

    # -- evaluation and export -------------------------------------------------------------------
    def eval_module(self) -> nn.Module:
        return (self.student_ema if self.distill else self.teacher)["backbone"]

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """The final-normed [CLS] (what DINOv2's k-NN and logistic regression read)."""
        return self.eval_module().forward_features(self.normalize(images))["x_norm_clstoken"]

    def _probe_inputs(self) -> tuple[list[int], list[bool]]:
        """``eval.probe_blocks`` (a block count above the depth is the depth) and ``eval.probe_avgpool``."""
        depth = len(self.eval_module().blocks)
        blocks = list(dict.fromkeys(min(n, depth) for n in self.run_cfg.eval.probe_blocks))
        return blocks, list(dict.fromkeys(self.run_cfg.eval.probe_avgpool))

    @torch.no_grad()
    def linear_features(self, images: Tensor) -> Tensor:
        """The widest of DINOv2's linear-probe inputs: the final-normed [CLS] of the last
        ``max(eval.probe_blocks)`` blocks and (if ``eval.probe_avgpool`` has ``true``) the average of the last
        block's patch tokens (``visrep.eval.features.linear_input``)."""
        blocks, pools = self._probe_inputs()
        return linear_input(self.eval_module(), self.normalize(images), max(blocks), any(pools))

    def probe_features(self, protocol: str):
        """k-NN and low-shot read the final-normed [CLS] (``knn.py``, ``log_regression.py``). The linear probe
        sweeps its input as ``eval/linear.py`` does: a classifier per (last n blocks' [CLS], with or without
        the patch average) pair, n in ``eval.probe_blocks`` (official [1, 4]), and keeps the best on
        validation."""
        if protocol != "linear":
            return self.features, self.feature_description
        blocks, pools = self._probe_inputs()
        columns = linear_input_columns(blocks, pools, self.eval_module().embed_dim)
        who = "student EMA" if self.distill else "teacher"
        clipped = [n for n in self.run_cfg.eval.probe_blocks if n > max(blocks)]
        note = f" ({', '.join(map(str, clipped))} above the depth {max(blocks)})" if clipped else ""
        pooled = " and ".join("with" if p else "without" for p in pools)
        return SweptInput(self.linear_features, columns), (
            f"DINOv2 linear inputs (eval/linear.py): the {who} backbone's final-normed [CLS] of the last "
            f"{' / '.join(map(str, blocks))} blocks{note}, {pooled} the average of its patch tokens; the best "
            "on validation")

    def export_modules(self) -> dict[str, Export]:
        mods = {"teacher_backbone": self.eval_module(), "student_backbone": self.student["backbone"]}
        nets = {"teacher_backbone": ("teacher", self.teacher), "student_backbone": ("student", self.student)}

        def formats(name: str) -> dict:  # official: dinov2's backbone; with heads teacher_checkpoint.pth's layout
            role, net = nets[name]
            parts = {h: f"{role}.{h}" for h in ("dino_head", "ibot_head") if h in net}
            return declare(official={"layout": "dinov2", "parts": parts}, timm="vit")

        return {k: Export(v, {**module_metadata(v), **formats(k)}) for k, v in mods.items()}


def load_teacher(path: str, data_info: DataInfo) -> nn.ModuleDict:
    """The frozen teacher (backbone and heads) of a visrep DINOv2 training checkpoint."""
    from visrep.config import build_config

    state = load_checkpoint(path)   # a clear CheckpointError for a missing, truncated or foreign file
    if "config" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a visrep training checkpoint (no 'config' / 'model')")
    tcfg = state["config"]
    tcfg["method"] = {**tcfg["method"], "teacher_checkpoint": None}
    cfg = build_config(tcfg)
    if cfg.method.name != "dinov2":
        raise ValueError(f"{path} is a {cfg.method.name} checkpoint; distillation needs a DINOv2 teacher")
    info = DataInfo.from_dict(state.get("data_info", data_info.to_dict()))
    backbone = vit_from_config(cfg.model, info.in_chans, cfg.data.image_size, mask_token=True, rescale_init=False,
                               drop_path_rate=0.0)
    teacher = nn.ModuleDict({"backbone": backbone, **build_heads(cfg.method, cfg.model.embed_dim)})
    which = "student_ema." if any(k.startswith("student_ema.") for k in state["model"]) else "teacher."
    teacher.load_state_dict({k[len(which):]: v for k, v in state["model"].items() if k.startswith(which)})
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
