"""PAWS: semi-supervised learning by predicting view assignments with support samples.

Assran et al., "Semi-Supervised Learning of Visual Features by Non-Parametrically Predicting View
Assignments with Support Samples", ICCV 2021; official code facebookresearch/suncet @ 731547d.

    U unlabelled images -> 2 large views u1, u2 + M small views; S labelled supports, labels Y
    h = head(encoder([supports, u1, u2])); z = pred(h)      # one call: one BN group
    p = snn(z_views, z_supports, Y)                          # supports gathered over processes
    with no_grad: t = sharpen(snn(h_views swapped, h_supports, Y), T)
    loss = CE(t, p) + sum pbar log pbar (pbar = mean sharpen(p)); SGD in LARS, wd 1e-6

No teacher. Supports come from their own stream (``labels_per_class``, ``label_fraction`` or
``method.labels_file``); backbones: our ViT, torchvision ResNets or the official WRN-28-2.
Specification and notes: docs/methods/paws.md
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from visrep.data.crops import CropSpec, take_crops
from visrep.data.views import PhotometricSpec, photometric_views
from visrep.errors import ConfigError
from visrep.eval.protocols import Protocol
from visrep.formats import declare
from visrep.losses import fp32_loss, paws_loss, smoothed_one_hot, snn
from visrep.models import encode_views, vit_from_config
from visrep.models.projection import PredictionHead, ProjectionHead
from visrep.models.resnet import TorchvisionResNet
from visrep.models.wide_resnet import WideResNet, wide_resnet28_2
from visrep.optim.groups import decay_groups, no_decay_bias_bn, no_decay_paws

from .base import DataInfo, Export, Method, Step, StreamSpec, check_vit_config, module_metadata


@dataclass
class PAWSConfig:
    name: Literal["paws"] = "paws"
    backbone: Literal["vit", "resnet18", "resnet50", "wrn28_2", "wrn"] = "vit"  # resnet*: torchvision;
    # wrn28_2: the official CIFAR WRN-28-2; wrn: WRN-<wrn_depth>-<wrn_widen> (the same official class)
    wrn_depth: int = 28
    wrn_widen: int = 2
    hidden_dim: int = 2048
    output_dim: int = 128
    use_pred_head: bool = False
    temperature: float = 0.1
    sharpen: float = 0.25
    me_max: bool = True
    label_smoothing: float = 0.1
    classes_per_batch: int | None = None       # None: every class each step
    supports_per_class: int = 6                 # images per class per step and process
    supervised_views: int = 2
    labels_per_class: int | None = None         # the labelled subset: a count per class ...
    label_fraction: float | None = 0.1          # ... or a fraction of each class ...
    labels_file: str | None = None              # ... or a label-split file (visrep.data.subsets)
    multicrop: int = 6
    crop_scale: tuple[float, float] = (0.75, 1.0)
    mc_size: int = 18
    mc_scale: tuple[float, float] = (0.3, 0.75)
    hflip: bool = True
    color_jitter: float = 0.5                   # jitter (0.8s, 0.8s, 0.8s, 0.2s) with p=0.8
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    solarize_p: float = 0.2
    threshold: float = 1e-4


class PAWS(Method):
    feature_description = "PAWS probe features: the backbone output ([CLS] or pooled ResNet features), before the heads"
    schedule_offset = 0  # suncet's WarmupCosineSchedule is a LambdaLR stepped after the optimizer

    @classmethod
    def validate(cls, cfg) -> None:
        m, mc = cfg.method, cfg.model
        if m.backbone == "vit" and not mc.class_token:
            raise ConfigError("PAWS (ViT backbone) represents an image by its [CLS] token: "
                              "model.class_token must be true")
        if sum(v is not None for v in (m.labels_per_class, m.label_fraction, m.labels_file)) != 1:
            raise ConfigError("PAWS: set exactly one of method.labels_per_class, method.label_fraction and "
                              "method.labels_file (the others null)")
        if m.label_fraction is not None and not 0 < m.label_fraction <= 1:
            raise ConfigError(f"method.label_fraction={m.label_fraction} must be in (0, 1]")
        if m.supports_per_class < 1 or m.supervised_views < 1:
            raise ConfigError("method.supports_per_class and method.supervised_views must be >= 1")
        if m.backbone == "vit":
            check_vit_config(cfg, {"data.image_size": cfg.data.image_size, "method.mc_size": m.mc_size})
        if not 0 <= m.label_smoothing < 1 or m.temperature <= 0 or m.sharpen <= 0:
            raise ConfigError("method.label_smoothing must be in [0, 1), temperature and sharpen > 0")
        if m.backbone == "wrn" and (m.wrn_depth < 4 or (m.wrn_depth - 4) % 6 or m.wrn_widen < 1):
            raise ConfigError(f"method.wrn_depth={m.wrn_depth} must be 6n + 4 and method.wrn_widen >= 1")
        if m.use_pred_head and m.output_dim % 4:
            raise ConfigError(f"method.output_dim={m.output_dim} must be divisible by 4 for the prediction head")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__(cfg, data_info)
        m, mc = cfg.method, cfg.model
        if not self.data_info.num_classes:
            raise ValueError("PAWS needs labelled data (data_info.num_classes)")
        self.num_classes = self.data_info.num_classes
        if m.backbone == "vit":
            self.encoder = vit_from_config(mc, self.data_info.in_chans, self.image_size, rescale_init=False)
        elif m.backbone == "wrn28_2":  # the official CIFAR-10 backbone
            self.encoder = wide_resnet28_2(self.data_info.in_chans, dropout=0.0)  # official init_model
        elif m.backbone == "wrn":
            self.encoder = WideResNet(m.wrn_depth, m.wrn_widen, dropout=0.0, in_chans=self.data_info.in_chans)
        else:
            self.encoder = TorchvisionResNet(m.backbone, self.data_info.in_chans)
        self.head = ProjectionHead(self.encoder.embed_dim, m.hidden_dim, m.output_dim, use_bn=True, activation="relu")
        self.pred = PredictionHead(m.output_dim) if m.use_pred_head else None
        s = m.color_jitter
        self.spec = PhotometricSpec(jitter_p=m.jitter_p, grayscale_p=m.grayscale_p, blur_p=m.blur_p,
                                    solarize_p=m.solarize_p, brightness=0.8 * s, contrast=0.8 * s,
                                    saturation=0.8 * s, hue=min(0.5, 0.2 * s))

    def streams(self) -> dict[str, StreamSpec]:
        m = self.cfg
        large = dict(size=self.image_size, scale=tuple(m.crop_scale), hflip=m.hflip)
        crops = {"large": CropSpec(count=2, **large)}
        if m.multicrop:
            crops["small"] = CropSpec(m.mc_size, m.multicrop, tuple(m.mc_scale), hflip=m.hflip)
        return {"main": StreamSpec(crops=crops),
                "supports": StreamSpec(sampler="class_balanced", classes=m.classes_per_batch,
                                       per_class=m.supports_per_class, labels_per_class=m.labels_per_class,
                                       label_fraction=m.label_fraction, labelled_file=m.labels_file,
                                       crops={"views": CropSpec(count=m.supervised_views, **large)})}

    # -- data ------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        streams = self.streams()

        def views(b: dict, stream: str) -> dict[str, Tensor]:
            return {k: photometric_views(v, self.spec, self.normalize, generator)
                    for k, v in take_crops(b, streams[stream].crops, generator, as_float=False).items()}

        out = {k: v for k, v in batch.items() if k not in ("image", "crops")}
        out.update(views(batch, "main"))
        sup = batch["supports"]
        out["supports"] = {**{k: v for k, v in sup.items() if k not in ("image", "crops")}, **views(sup, "supports")}
        return out

    # -- training --------------------------------------------------------------------------------
    def embed(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``(h, z)``: projection-head output and prediction-head output (``z = h`` without one);
        views of one size in one call (official: supports and the large views share BN statistics)."""
        h = encode_views(self.encoder, views, None, self.head)
        return h, (self.pred(h) if self.pred is not None else h)

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        m = self.cfg

        def view_major(x: Tensor) -> list[Tensor]:
            return list(x.transpose(0, 1).unbind(0))

        sup = batch["supports"]
        sup_views = view_major(sup["views"])
        n_sup = sum(v.shape[0] for v in sup_views)
        views = sup_views + view_major(batch["large"]) + (view_major(batch["small"]) if "small" in batch else [])
        h, z = self.embed(views)
        B = batch["large"].shape[0]
        with fp32_loss(h, z) as (h, z):  # official: the loss in float32, autocast off
            labels = smoothed_one_hot(sup["label"], self.num_classes, m.label_smoothing, dtype=z.dtype)
            labels = labels.repeat(m.supervised_views, 1)
            target_views = h[n_sup:n_sup + 2 * B].detach()
            target_views = torch.cat([target_views[B:], target_views[:B]])
            out = paws_loss(z[n_sup:], z[:n_sup], labels, target_views, h[:n_sup].detach(), labels,
                            tau=m.temperature, T=m.sharpen, multicrop=m.multicrop if "small" in batch else 0,
                            me_max_weight=1.0 if m.me_max else 0.0, threshold=m.threshold)
        self.record_health(embeddings=z[n_sup:], target_probs=out["targets"])
        return {k: out[k] for k in ("loss", "ce", "me_max")}

    def before_optimizer_step(self, step: Step) -> None:
        self.head.zero_redundant_bias_grads_()

    def param_groups(self) -> list[dict]:
        # official: no weight decay and no LARS adaptation for names with 'bias' or 'bn' only (a ResNet's
        # downsample BN is decayed and adapted); the ViT (no official one) also excludes its 1-D tensors
        mods = [self.encoder, self.head] + ([self.pred] if self.pred is not None else [])
        return decay_groups(*mods, no_decay=no_decay_bias_bn if self.cfg.backbone == "vit" else no_decay_paws)

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        return self.encoder(self.normalize(images))[:, 0]

    @property
    def feature_dim(self) -> int:
        return self.encoder.embed_dim

    @torch.no_grad()
    def snn_classify(self, support_images: Tensor, support_labels: Tensor, query_images: Tensor,
                     batch_size: int = 512) -> Tensor:
        """The paper's soft nearest-neighbour classifier: class scores ``[N, C]`` of ``query_images``
        from the labelled ``support_images`` (projection-head embeddings, prediction head when
        there is one, as ``snn_eval.py --use-pred``; cosine / tau, one-hot labels)."""
        was = self.training
        self.eval()

        def emb(x: Tensor) -> Tensor:
            chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
            return torch.cat([self.embed([self.normalize(c)])[1] for c in chunks])

        s = emb(support_images)
        y = smoothed_one_hot(support_labels.to(s.device), self.num_classes, 0.0, dtype=s.dtype)
        q = emb(query_images)
        self.train(was)
        return snn(q, s, y, self.cfg.temperature)

    def labelled_subset(self, train_labels: Tensor) -> Tensor:
        """Indices of the labelled subset the support stream draws from (the same seed, the same
        choice as in training, for the same training set)."""
        from types import SimpleNamespace

        from visrep.data.streams import ClassBalancedIndices

        return ClassBalancedIndices(SimpleNamespace(targets=train_labels.cpu()), self.streams()["supports"],
                                    name="supports", seed=self.run_cfg.train.seed, rank=0, world_size=1).labelled

    @classmethod
    def protocols(cls) -> dict[str, Protocol]:
        return {"snn": Protocol("soft nearest-neighbour top-1 % over the labelled subset",
                                lambda m, ctx: m.snn_accuracy(*ctx.split("train")[1:], *ctx.split("test")[1:]))}

    @torch.no_grad()
    def snn_accuracy(self, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                     test_labels: Tensor) -> float:
        """The paper's evaluation: soft nearest neighbours over the labelled training subset, top-1 %."""
        idx = self.labelled_subset(train_labels)
        scores = self.snn_classify(train_images[idx], train_labels[idx], test_images)
        return (scores.argmax(1).cpu() == test_labels.cpu()).float().mean().item() * 100

    def eval_module(self) -> nn.Module:
        return self.encoder

    def export_modules(self) -> dict[str, Export]:
        vit = type(self.encoder).__name__ == "VisionTransformer"
        formats = declare(timm="vit" if vit else None)
        return {"encoder": Export(self.encoder, {**module_metadata(self.encoder), **formats})}
