"""Evaluations beyond frozen features, and how a method's are found.

k-NN, linear and low-shot run on extracted features (:func:`visrep.eval.run_protocols`). The
protocols here take the method itself. Generic ones need a capability the method declares:

    finetune             finetune_network()   every encoder: end to end, layer-wise lr decay
    zeroshot, retrieval  encode_text()        vision-language (with encode_images / similarity)
    fid                  sample()             generators

A method adds its own with ``Method.protocols()`` (IWM: ``mrr``; the JEPA family: ``predictor_ft``;
PAWS: ``snn``), their settings in its own config section. :func:`available` lists what a method
answers; :func:`run` runs one by name. Nothing here names a method.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

FEATURE_PROTOCOLS = ("knn", "linear", "lowshot")
Result = float | dict[str, float]


@dataclass(frozen=True)
class Protocol:
    """``run(method, ctx)`` -> a number or ``{name: number}``; ``needs``: the capability it asks of
    the method (None: the method declared it itself)."""

    about: str
    run: Callable[[Any, EvalContext], Result]
    needs: str | None = None


@dataclass
class EvalContext:
    """What a protocol may use: the run's config, its splits as in-memory uint8 images
    (``split("test") -> (dataset, images, labels)``), the device and a seeded generator."""

    cfg: Any
    split: Callable[[str], tuple[Any, torch.Tensor, torch.Tensor]]
    device: str
    generator: torch.Generator

    def finetune_set(self, method) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training images, labels and the indices a fine-tuning protocol learns from
        (``eval.finetune_subset``): ``finetune_samples`` random images (null), the method's labelled
        subset (``"labelled"``, ``Method.labelled_subset``: the images whose labels pretraining used),
        or the indices of a label-split file."""
        from visrep.data.subsets import read_label_split

        _, x, y = self.split("train")
        e, subset = self.cfg.eval, self.cfg.eval.finetune_subset
        if subset is None:
            return x, y, torch.randperm(len(x), generator=self.generator)[:e.finetune_samples]
        if subset == "labelled":
            if not method.can("labelled_subset"):
                raise ValueError(f"eval.finetune_subset=labelled: {self.cfg.method.name} trains without a labelled "
                                 "subset (give a label-split file, or leave it null)")
            return x, y, method.labelled_subset(y)
        keep = read_label_split(subset)
        if len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= len(x)):
            raise ValueError(f"eval.finetune_subset={subset}: indices outside the {len(x)} training images")
        return x, y, keep


# -- the generic protocols -----------------------------------------------------------------------
def _finetune(method, ctx: EvalContext) -> dict[str, float]:
    from .finetune import finetune_encoder

    e = ctx.cfg.eval
    _, images, labels = ctx.split("test")
    x, y, keep = ctx.finetune_set(method)
    classes = int(max(y.max(), labels.max())) + 1
    nets = {"pretrained": method.finetune_network()}
    if e.finetune_baseline:
        nets["random init"] = method.random_init_baseline().to(ctx.device).finetune_network()
    out = {}
    for name, net in nets.items():
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=ctx.generator))
        out[name] = finetune_encoder(net, net.vit, net.feature_dim, classes, (x[keep], y[keep]), (images, labels),
                                     epochs=e.finetune_epochs, lr=e.finetune_lr, layer_decay=e.finetune_layer_decay,
                                     generator=torch.Generator().manual_seed(seed), device=ctx.device,
                                     desc=f"fine-tune ({name})")["top1"]
    return out


def _zeroshot(method, ctx: EvalContext) -> dict[str, float]:
    from .zeroshot import DEFAULT_TEMPLATES, zeroshot_classification

    ds, images, labels = ctx.split("test")
    classes = method.data_info.classes or getattr(ds, "classes", None)
    if not classes:
        raise ValueError("zero-shot classification needs class names (the dataset's classes)")
    templates = ctx.cfg.eval.zeroshot_templates or getattr(ds, "templates", None) or DEFAULT_TEMPLATES
    return zeroshot_classification(method, images, labels, classes, templates, batch_size=ctx.cfg.eval.batch_size)


def _retrieval(method, ctx: EvalContext) -> dict[str, float]:
    from .retrieval import image_text_retrieval

    ds, images, _ = ctx.split("test")
    if not hasattr(ds, "captions"):
        raise ValueError("retrieval needs a test set with captions (a captions(index) method)")
    n = min(ctx.cfg.eval.retrieval_samples, len(images))
    return image_text_retrieval(method, images[:n], [ds.captions(i) for i in range(n)],
                                batch_size=ctx.cfg.eval.batch_size)


def _fid(method, ctx: EvalContext) -> float:
    from .fid import fid_protocol

    e = ctx.cfg.eval
    _, x, y = ctx.split("train")
    _, images, labels = ctx.split("test")
    return fid_protocol(method, (x, y), (images, labels), ctx.cfg.data.name, n=e.fid_samples, feature=e.fid_feature,
                        weights=e.fid_weights, batch_size=e.batch_size, seed=ctx.cfg.train.seed, device=ctx.device)


GENERIC: dict[str, Protocol] = {
    "finetune": Protocol("top-1 (%) after fine-tuning the encoder end to end (layer-wise lr decay)", _finetune,
                         needs="finetune_network"),
    "zeroshot": Protocol("zero-shot classification (%)", _zeroshot, needs="encode_text"),
    "retrieval": Protocol("image-text retrieval recall (%)", _retrieval, needs="encode_text"),
    "fid": Protocol("FID of eval.fid_samples samples vs as many test images (a domain FID unless "
                    "eval.fid_feature=inception)", _fid, needs="sample"),
}


def available(method_or_class) -> dict[str, Protocol]:
    """Every protocol (besides the feature ones) a method, or a method class, answers."""
    out = {name: p for name, p in GENERIC.items() if method_or_class.can(p.needs)}
    out.update(method_or_class.protocols())
    return out


def describe(name: str, method_classes=()) -> str:
    """What protocol ``name`` measures (generic or declared by one of ``method_classes``)."""
    if name in GENERIC:
        return GENERIC[name].about
    for cls in method_classes:
        if name in cls.protocols():
            return cls.protocols()[name].about
    return name


def run(name: str, method, ctx: EvalContext) -> Result:
    """Run protocol ``name`` on ``method``; a clear error when the method does not answer it."""
    protocols = available(method)
    if name not in protocols:
        known = ", ".join(sorted(protocols)) or "none"
        why = f"needs a method with {GENERIC[name].needs}()" if name in GENERIC else "is not declared"
        raise ValueError(f"protocol {name!r} {why}; {ctx.cfg.method.name} answers {known} "
                         f"(besides {', '.join(FEATURE_PROTOCOLS)})")
    method.to(ctx.device)
    return protocols[name].run(method, ctx)


def format_result(value: Result) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.2f}" for k, v in value.items())
    return f"{value:.3f}"
