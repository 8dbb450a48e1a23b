"""The Method contract: the one abstraction every method shares.

A method is an ``nn.Module`` that owns everything method-specific (EMA teachers, predictors,
prototypes, centres, a text tower) and answers the engine's and the runner's questions through the
hooks below. Neither the engine nor the runner ever names a method or one of its attributes, so a
new method is one file in ``methods/`` plus a line in ``METHODS`` (and its recipes in ``configs/``).

Life of a method (who calls what)::

    load_config(path, overrides)  -> Method.validate(cfg)               # before any data is read
    runner: info = DataInfo.of(dataset); method = cls(cfg, info)        # info is saved in checkpoints
    trainer: for each step s (seeded per (seed, s, rank); exact on resume):
        batch = {"image", "label", "index", ["caption"], <stream>: {...}}     # streams()
        batch = method.prepare_batch(batch, generator)                      # views, masks
        out   = method(batch, Step)  -> training_step                       # {"loss", logs...}
        out["loss"].backward(); finite check
        method.before_optimizer_step(Step)                                  # cancel grads, clip parts
        optimizer.step()  (param_groups(): lr_scale, wd_scale, freeze_until, wd_exclude)
        method.after_optimizer_step(Step)                                   # EMA, centres, queues
    runner / eval: method.features(images)  [N, feature_dim]; eval_module(); export_modules();
                   random_init_baseline(); optional sample(n, labels) and encode_text(texts)

Batches are dicts. On the in-memory path ``image`` is the raw ``uint8 [B, C, H, W]`` tensor; on the
file (DataLoader) path a stream that declares ``crops`` gets ``crops`` (its views, cut per sample from
the full image), any other ``image`` resized and centre-cropped (:func:`visrep.data.crops.take_crops`).
``label`` (int64, -1 when unknown) and ``index`` (dataset indices) are always present, ``caption``
(a list of each image's captions) when the dataset has captions. Extra streams declared by
:meth:`Method.streams` arrive as nested dicts under their names (e.g. ``batch["supports"]``).

Every persistent state lives in the module's ``state_dict`` (parameters and buffers), so checkpoints
and resume need no method-specific code. Collectives come from :mod:`visrep.distributed` and take an
explicit process group. ``tests/test_contract.py`` runs every registered method through the same
checks (finite loss, exact resume, 2 processes == 1 process on the doubled batch, export round trip,
feature shape).
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from visrep.data.crops import CropSpec
from visrep.errors import ConfigError
from visrep.eval.protocols import Protocol
from visrep.models.vit import Normalize
from visrep.optim.groups import decay_groups


@dataclass
class Step:
    """Where training is: handed to every hook.

    ``step`` counts optimizer steps already taken (0 for the first batch); ``total_steps`` is the
    schedule horizon (``ipe_scale x`` the run length); ``lr``/``wd`` are the schedules' values.
    """

    step: int
    epoch: int
    total_steps: int
    steps_per_epoch: int
    lr: float = 0.0
    wd: float = 0.0

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


@dataclass(frozen=True)
class DataInfo:
    """What the training data tells a method, saved in every checkpoint (no data needed to rebuild)."""

    in_chans: int
    image_size: int
    num_classes: int | None = None
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    classes: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataInfo:
        d = dict(d)
        for k in ("mean", "std", "classes"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class StreamSpec:
    """A data stream a method consumes each step, besides (or as) the main one.

    ``sampler="epoch"``: the shuffled, sharded epoch order (the main stream). ``"class_balanced"``:
    each step ``classes`` classes (None: all) x ``per_class`` images, drawn from a labelled subset
    (``labels_per_class`` images per class, or a ``label_fraction`` of each class; None: every
    labelled image; ``labelled_file``: the indices of a label-split file, see
    :mod:`visrep.data.subsets`), chosen once from ``seed``; each process draws its own images (seeded by seed,
    stream, step and rank), so a resumed run gets the same supports. ``batch_size=None``: the run's
    ``train.batch_size`` (main stream only). ``captions=True`` adds each image's captions. ``crops``:
    the views the method takes (:class:`visrep.data.crops.CropSpec` by name); without, a file dataset's
    images arrive resized and centre-cropped to ``data.image_size``.
    """

    sampler: Literal["epoch", "class_balanced"] = "epoch"
    captions: bool = False
    batch_size: int | None = None
    classes: int | None = None
    per_class: int = 1
    labels_per_class: int | None = None
    label_fraction: float | None = None
    labelled_file: str | None = None       # the labelled subset from a label-split file (dataset indices)
    crops: dict[str, CropSpec] | None = None  # the views' geometry, cut from the full-resolution image (per
                                           # sample in the loader workers for file datasets, batched for
                                           # in-memory ones; prepare_batch takes them with data.crops.take_crops)


@dataclass
class Export:
    """A module to export and the metadata needed to rebuild it (``visrep.hub.load_exported``)."""

    module: nn.Module
    metadata: dict = field(default_factory=dict)


class Method(nn.Module):
    """Base class: hooks with sensible defaults. A subclass implements ``__init__(cfg, data_info)``
    (calling ``super().__init__(cfg, data_info)``), ``training_step`` and usually ``prepare_batch``,
    ``after_optimizer_step`` and ``features``."""

    feature_description: str = "encoder output"
    # the official schedules' convention: train step i uses the lr / wd formula at i + schedule_offset
    # (1: a counter incremented before use, I-JEPA / MSN / StoP; 0: a LambdaLR stepped after the optimizer)
    schedule_offset: int = 1
    # hooks the base class declares but only some methods implement (``can`` tells)
    OPTIONAL_CAPABILITIES = ("sample", "encode_text", "encode_images", "similarity", "labelled_subset")

    def __init__(self, cfg, data_info: DataInfo):
        super().__init__()
        self.run_cfg = cfg                       # the whole run's config
        self.cfg = getattr(cfg, "method", None)  # this method's own section
        self.data_info = data_info if isinstance(data_info, DataInfo) else DataInfo.from_dict(data_info)
        self.image_size = self.data_info.image_size   # the training resolution, saved with the weights
        self.normalize = Normalize(self.data_info.mean, self.data_info.std)  # uint8 / [0, 1] -> standardised

    # -- set-up ----------------------------------------------------------------------------------
    @classmethod
    def validate(cls, cfg) -> None:
        """Reject a bad configuration (raise ``ConfigError`` naming the key) before any data is read."""

    def streams(self) -> dict[str, StreamSpec]:
        """The data streams of each step: ``"main"`` plus e.g. PAWS ``"supports"``."""
        return {"main": StreamSpec()}

    # -- training --------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Views, masks, crops for one batch. All randomness must come from ``generator`` (seeded per
        step and process by the engine, which makes resumed runs exact). Default: unchanged."""
        return batch

    def forward(self, batch: dict, step: Step) -> dict[str, Tensor]:
        # DDP hooks forward(); the engine calls the (possibly wrapped) module, which lands here.
        return self.training_step(batch, step)

    def training_step(self, batch: dict, step: Step) -> dict[str, Tensor]:
        """Return ``{"loss": scalar, ...}``; the other entries are logged (detached)."""
        raise NotImplementedError

    def record_health(self, **tensors: Tensor) -> None:
        """Keep (detached, no copy) what the loss sees, for the engine's collapse signals at log steps
        (:mod:`visrep.engine.health`): ``embeddings`` [N, D] it compares, ``target_probs`` [N, K] of
        prototype / self-distillation targets, ``target_repr`` [N, D] it regresses."""
        self._health = {k: v.detach() for k, v in tensors.items() if v is not None}

    def health_inputs(self) -> dict[str, Tensor]:
        """The tensors of the last :meth:`record_health` (empty when the method records none)."""
        return getattr(self, "_health", {})

    def param_groups(self) -> list[dict]:
        """Optimizer groups. Keys besides ``params``: ``lr_scale``, ``wd_scale``, ``freeze_until``
        (lr 0 before that step), ``wd_exclude`` (see :mod:`visrep.optim.groups`)."""
        return decay_groups(self)

    def before_optimizer_step(self, step: Step) -> None:
        """After backward and the finite check, before clipping and the optimizer step."""

    @torch.no_grad()
    def after_optimizer_step(self, step: Step) -> None:
        """After every optimizer step (EMA updates, centre updates, queues)."""

    def ddp_options(self) -> dict[str, Any]:
        """Extra ``DistributedDataParallel`` keywords, e.g. ``find_unused_parameters=True``."""
        return {}

    def fsdp_units(self) -> list[nn.Module]:
        """Submodules that FSDP2 shards as units of their own (``train.parallel=fsdp``); the method is
        the root unit and holds every other trained parameter. A unit's parameters are gathered for its
        forward / backward and freed after, so peak memory is about one unit plus the shards.

        Default: each entry of every ``nn.ModuleList`` whose attribute name ends in ``blocks``
        (``blocks``, ``predictor_blocks``: the transformer blocks of encoders, predictors, students,
        heads) when all its parameters require gradients. EMA targets and frozen teachers
        (``requires_grad=False``) are never units: every parameter the optimizer does not update stays
        a plain, replicated tensor (see :mod:`visrep.engine.fsdp`)."""
        units = []
        for name, module in self.named_modules():
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1].endswith("blocks"):
                for block in module:
                    params = list(block.parameters())
                    if params and all(p.requires_grad for p in params):
                        units.append(block)
        return units

    # -- capabilities the runner asks for --------------------------------------------------------
    def eval_module(self) -> nn.Module:
        """The module features come from (moved to the evaluation device)."""
        return self.encoder

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`features`."""
        return self.eval_module().embed_dim

    def features(self, images: Tensor) -> Tensor:
        """Frozen probe features ``[N, feature_dim]`` of raw ``uint8`` (or float [0, 1]) images."""
        raise NotImplementedError

    def probe_features(self, protocol: str) -> tuple[Callable[[Tensor], Tensor], str]:
        """``(images -> features, description)`` that the frozen-feature ``protocol`` (``knn``, ``linear``,
        ``lowshot``) reads, as the paper's evaluation code does: :meth:`features` for all three unless a
        method says otherwise (DINOv2's linear probe: [CLS] of the last blocks + patch average)."""
        return self.features, self.feature_description

    def export_modules(self) -> dict[str, Export]:
        """Modules ``visrep export`` can write (the first is the default), with rebuild metadata."""
        return {"encoder": Export(self.eval_module(), module_metadata(self.eval_module()))}

    def random_init_baseline(self, seed: int | None = None) -> Method:
        """The same architecture, untrained, for side-by-side evaluation: initialised with ``seed``
        (default ``train.seed``, the pretrained run's own initial weights)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.run_cfg.train.seed if seed is None else seed)
            return type(self)(self.run_cfg, self.data_info).eval()

    def finetune_network(self) -> FeatureNetwork:
        """A trainable copy of the probe-feature path (images -> ``[N, feature_dim]``) for end-to-end
        fine-tuning (``visrep eval --protocols finetune``); its ``vit`` gets layer-wise lr decay."""
        return FeatureNetwork(self)

    @classmethod
    def protocols(cls) -> dict[str, Protocol]:
        """The evaluations this method answers itself, besides the generic ones of
        :mod:`visrep.eval.protocols` (IWM: ``mrr``; PAWS: ``snn``), each ``Protocol(about, run(method,
        ctx))`` with its settings in the method's config section."""
        return {}

    @classmethod
    def can(cls, capability: str) -> bool:
        """Whether ``capability`` is available: an optional one (``OPTIONAL_CAPABILITIES``) must be
        implemented by the method; any other hook exists on every method."""
        if capability in Method.OPTIONAL_CAPABILITIES:
            return getattr(cls, capability, None) is not getattr(Method, capability, None)
        return hasattr(cls, capability)

    def sample(self, n: int, labels: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Generators only: ``n`` images ``uint8 [n, C, H, W]`` (FID)."""
        raise NotImplementedError(f"{type(self).__name__} is not a generative model")

    def encode_text(self, texts: list[str]) -> Tensor | dict[str, Tensor]:
        """Vision-language methods only: text embeddings (zero-shot, retrieval); CLIP / SigLIP / Llip
        return a dict of tensors with a leading text axis (see ``visrep.eval.zeroshot``)."""
        raise NotImplementedError(f"{type(self).__name__} has no text tower")

    def encode_images(self, images: Tensor) -> Tensor | dict[str, Tensor]:
        """Vision-language methods only: what :meth:`similarity` compares with text embeddings."""
        raise NotImplementedError(f"{type(self).__name__} has no image-text embedding")

    def similarity(self, image: dict[str, Tensor], text: dict[str, Tensor]) -> Tensor:
        """Vision-language methods only: ``[N_images, N_texts]`` scores of encoded images and texts."""
        raise NotImplementedError(f"{type(self).__name__} has no image-text similarity")

    def labelled_subset(self, train_labels: Tensor) -> Tensor:
        """Methods that pretrain with labels (PAWS): the indices of the training images whose labels
        pretraining used (``eval.finetune_subset=labelled`` fine-tunes on exactly these)."""
        raise NotImplementedError(f"{type(self).__name__} pretrains without labels")


class FeatureNetwork(nn.Module):
    """``method.features`` with gradients, on a private copy of the method: only the copy's
    ``eval_module()`` (the ViT the features come from) is trainable; everything else the feature
    path uses (normalisation, resizing, pooling, projections) stays as the method defines it."""

    def __init__(self, method: Method):
        super().__init__()
        self.method = copy.deepcopy(method).requires_grad_(False)
        self.method.eval_module().requires_grad_(True)
        self.feature_dim = method.feature_dim
        self._features = inspect.unwrap(type(method).features)  # without its no_grad decorator

    @property
    def vit(self) -> nn.Module:
        return self.method.eval_module()

    def forward(self, images: Tensor) -> Tensor:
        return self._features(self.method, images)


def check_vit_config(cfg, sizes: dict[str, int] | None = None, class_token: str | None = None) -> None:
    """The ViT checks every method's ``validate`` shares (``ConfigError`` naming the key): the heads
    divide ``model.embed_dim``; every input size in ``sizes`` (default: ``data.image_size``) is a
    multiple of ``model.patch_size``; ``class_token``, when given, says why a [CLS] token is required."""
    mc = cfg.model
    if class_token and not mc.class_token:
        raise ConfigError(f"{class_token}: model.class_token must be true")
    if mc.embed_dim % mc.num_heads:
        raise ConfigError(f"model.embed_dim={mc.embed_dim} must be divisible by model.num_heads={mc.num_heads}")
    for key, size in (sizes or {"data.image_size": cfg.data.image_size}).items():
        if size % mc.patch_size:
            raise ConfigError(f"{key}={size} must be a multiple of model.patch_size={mc.patch_size}")


def module_metadata(module: nn.Module) -> dict:
    """Rebuild metadata of a module that records its constructor arguments (``module.arch``)."""
    arch = getattr(module, "arch", None)
    if arch is None:
        raise TypeError(f"{type(module).__name__} does not record its architecture (an ``arch`` dict)")
    return {"class": type(module).__name__, "arch": dict(arch)}


__all__ = ["DataInfo", "Export", "FeatureNetwork", "Method", "Step", "StreamSpec", "check_vit_config", "decay_groups",
           "module_metadata"]
