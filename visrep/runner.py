"""What the CLI does, as plain functions: pretrain, evaluate, export, demo.

Wires the layers together (data -> method -> engine -> eval); holds no algorithm of its own.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from visrep.config import DEMO_RECIPE, Config, build_config, load_config, resolve_config
from visrep.data import build_dataset
from visrep.data.datasets import Forwarding
from visrep.data.transforms import dataset_stats
from visrep.methods import DataInfo, Method, build_method

DEMO_CONFIG = resolve_config(DEMO_RECIPE)


# -- data --------------------------------------------------------------------------------------------
def load_split(cfg: Config, split: str, transform=None):
    kw = {"image_size": cfg.data.image_size} if cfg.data.name == "procedural" else {}  # generated at any size
    ds = build_dataset(cfg.data.name, split, root=cfg.data.root, download=cfg.data.download, transform=transform, **kw)
    if split == "train" and getattr(cfg.data, "subset_file", None):  # a curated file list (visrep curate)
        from visrep.curate import read_file_list

        names = [str(s[0]) for s in ds.samples] if hasattr(ds, "samples") else None
        ds = _subset(ds, read_file_list(cfg.data.subset_file, names))
    if split == "train" and cfg.data.train_subset:
        ds = _subset(ds, cfg.data.train_subset)
    if split == "train" and cfg.data.long_tail_ratio:
        from visrep.data.subsets import long_tailed_indices

        if not hasattr(ds, "tensors"):
            raise ValueError("data.long_tail_ratio needs an in-memory dataset (fashion_mnist, cifar10, procedural)")
        idx = long_tailed_indices(ds.tensors()[1], cfg.data.long_tail_ratio, seed=cfg.train.seed,
                                  profile=cfg.data.long_tail_profile)
        ds = _subset(ds, idx.tolist())
    if cfg.data.caption_templates:
        from visrep.data.captions import TemplateCaptions

        ds = TemplateCaptions(ds, cfg.data.caption_templates)
    return ds


def _subset(ds, n: int | list[int]):
    """The first ``n`` items of ``ds``, or the items at the listed indices."""
    from visrep.data.datasets import TensorImageDataset

    if hasattr(ds, "tensors"):
        images, labels = ds.tensors()
        idx = slice(0, n) if isinstance(n, int) else torch.as_tensor(n, dtype=torch.long)
        sub = TensorImageDataset(images[idx], labels[idx], transform=getattr(ds, "transform", None))
        for attr in ("num_classes", "classes"):
            if hasattr(ds, attr):
                setattr(sub, attr, getattr(ds, attr))
        return sub
    return _FirstN(ds, n)


class _FirstN(Forwarding, torch.utils.data.Subset):
    """The first ``n`` items (or the listed items) of a file dataset; forwards what the dataset tells
    (classes, channels, transform), selects ``targets`` and maps ``captions(i)`` through the indices."""

    forwarded = ("num_classes", "classes", "in_chans", "transform")

    def __init__(self, ds, n: int | list[int]):
        super().__init__(ds, range(min(n, len(ds))) if isinstance(n, int) else list(n))
        if hasattr(ds, "targets"):
            targets = list(ds.targets)
            self.targets = [targets[i] for i in self.indices]

    def __getattr__(self, name):
        if name == "captions" and hasattr(self.__dict__.get("dataset"), "captions"):
            return lambda i: self.dataset.captions(self.indices[i])
        return super().__getattr__(name)


def data_info(cfg: Config, ds) -> DataInfo:
    """What the training set tells the method (saved in every checkpoint)."""
    in_chans = getattr(ds, "in_chans", 3)
    mean, std = dataset_stats(cfg.data.name, in_chans)
    classes = getattr(ds, "classes", None)
    return DataInfo(in_chans=in_chans, image_size=cfg.data.image_size, num_classes=getattr(ds, "num_classes", None),
                    mean=tuple(mean), std=tuple(std), classes=tuple(classes) if classes else None)


def eval_images(ds, image_size: int):
    """What feature extraction iterates: ``(uint8 images, labels)`` for in-memory datasets, else the
    dataset itself with a resize + centre-crop transform that yields uint8 images."""
    from visrep.data.transforms import batch_resize_center_crop

    if hasattr(ds, "tensors"):
        images, labels = ds.tensors()
        if images.shape[-1] != image_size or images.shape[-2] != image_size:
            images = (batch_resize_center_crop(images, image_size) * 255).round().clamp(0, 255).to(torch.uint8)
        return images, labels
    return ds, None


def uint8_eval_transform(image_size: int):
    """Resize + centre crop to uint8 (methods normalise inside ``features``)."""
    from torchvision.transforms import v2

    return v2.Compose([v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


# -- pretrain ----------------------------------------------------------------------------------------
def pretrain(cfg: Config, resume: bool | str = False, fit_schedule_to_budget: bool = False):
    """Pretrain ``cfg.method`` on ``cfg.data``; returns (method, TrainResult)."""
    from visrep.engine import train
    from visrep.methods import METHODS

    METHODS[cfg.method.name].method_class().validate(cfg)  # (load_config did too) before any data is read
    train_ds = load_split(cfg, "train")
    eval_ds = None
    if cfg.train.online_knn:
        try:
            eval_ds = load_split(cfg, "test", transform=uint8_eval_transform(cfg.data.image_size))
        except (FileNotFoundError, ValueError):
            eval_ds = None
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process and every rerun
    method = build_method(cfg, data_info(cfg, train_ds))
    if not (cfg.data.in_memory and hasattr(train_ds, "tensors")):  # file datasets: per-sample transform
        train_ds.transform = method.sample_transform() or uint8_eval_transform(cfg.data.image_size)
    result = train(cfg, method, train_ds, eval_data=eval_ds, resume=resume,
                   fit_schedule_to_budget=fit_schedule_to_budget)
    return method, result


def load_trained(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, Method, dict]:
    """Rebuild the method saved in a training checkpoint, weights loaded."""
    from visrep.config import _set_dotted, parse_overrides
    from visrep.engine.checkpoint import CheckpointError, load_checkpoint

    state = load_checkpoint(path)
    tree = copy.deepcopy(state["config"])
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = build_config(tree)
    if "data_info" not in state:
        raise CheckpointError(f"{path} was written by an older visrep (no data_info); retrain or load its "
                              "weights with visrep.hub.load_official")
    method = build_method(cfg, DataInfo.from_dict(state["data_info"]))
    method.load_state_dict(state["model"])
    return cfg, method.eval(), state


# -- evaluation --------------------------------------------------------------------------------------
def raw_pixel_features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).float() / 255.0


def evaluate_feature_sets(feature_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], cfg: Config,
                          out_dir: str | Path | None = None, title: str = "results", notes: Sequence[str] = ()):
    """Run ``cfg.eval.protocols`` for several feature extractors side by side; print and save the table."""
    from visrep.eval import extract_features, format_table, run_protocols, save_results

    tf = uint8_eval_transform(cfg.data.image_size)
    train_ds, test_ds = load_split(cfg, "train", transform=tf), load_split(cfg, "test", transform=tf)
    xtr, ytr = eval_images(train_ds, cfg.data.image_size)
    xte, yte = eval_images(test_ds, cfg.data.image_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats = {}
    for name, fn in feature_fns.items():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, Method):
            owner.eval_module().to(device)
            owner.to(device)
        ftr, ltr = extract_features(fn, xtr, ytr, batch_size=cfg.eval.batch_size, device=device, desc=f"{name} train")
        fte, lte = extract_features(fn, xte, yte, batch_size=cfg.eval.batch_size, device=device, desc=f"{name} test")
        feats[name] = (ftr, ltr, fte, lte)
    results = run_protocols(feats, cfg.eval)
    table = format_table(results, title=title, notes=notes)
    print(table)
    if out_dir is not None:
        save_results(results, table, out_dir)
    return results, table


def evaluate_checkpoint(paths: Sequence[str], protocols: Sequence[str] = ("knn", "linear", "lowshot"),
                        out_dir: str | None = None, data_root: str | None = None, include_raw: bool = False,
                        overrides: Sequence[str] = ()):
    method_protocols = [p for p in protocols if p in METHOD_PROTOCOLS]
    protocols = [p for p in protocols if p not in METHOD_PROTOCOLS]
    overrides = list(overrides) + [f"eval.protocols=[{','.join(protocols)}]"]  # [] when only method protocols
    if data_root:
        overrides.append(f"data.root={data_root}")
    fns, notes, cfg, extra = {}, [], None, {}
    for p in paths:
        c, method, state = load_trained(p, overrides)
        cfg = cfg or c
        name = Path(p).parent.name + f"@{state['step']}"
        fns[name] = method.features
        notes.append(f"{name}: {method.feature_description}")
        for protocol in method_protocols:
            capability, what = METHOD_PROTOCOLS[protocol]
            if len(paths) > 1 and not _supports(method, capability):  # side by side: say n/a, don't fail
                notes.append(f"{name}: {what}: n/a ({c.method.name} has no {capability}())")
                continue
            extra[(protocol, name)] = _method_protocol(protocol, method, c)
            notes.append(f"{name}: {what}: {_format_protocol(extra[(protocol, name)])}")
    if include_raw:
        fns["raw pixels"] = raw_pixel_features
    out_dir = out_dir or str(Path(paths[0]).parent / "eval")
    if not protocols:
        table = "# evaluation\n\n" + "".join(f"* {n}\n" for n in notes)
        print(table)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "results.md").write_text(table)
        return {"method_protocols": {f"{k[0]}/{k[1]}": v for k, v in extra.items()}}, table
    return evaluate_feature_sets(fns, cfg, out_dir, title="evaluation", notes=notes)


# protocols a method answers itself: name -> (capability, what the number is)
METHOD_PROTOCOLS = {
    "mrr": ("world_model_mrr", "world-model MRR"),
    "predictor_ft": ("predictor_finetune", "top-1 with the encoder frozen, predictor + attentive head fine-tuned"),
    "zeroshot": ("encode_text", "zero-shot classification (%)"),
    "retrieval": ("encode_text", "image-text retrieval recall (%)"),
    "finetune": ("finetune_network", "top-1 (%) after fine-tuning the encoder end to end (layer-wise lr decay)"),
    "snn": ("snn_accuracy", "soft nearest-neighbour top-1 % over the labelled subset"),
    "fid": ("sample", "FID of eval.fid_samples samples vs as many test images (a domain FID unless "
                      "eval.fid_feature=inception)"),
}


def _format_protocol(value: float | dict[str, float]) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.2f}" for k, v in value.items())
    return f"{value:.3f}"


def _supports(method: Method, capability: str) -> bool:
    # the base class's optional hooks (sample, encode_text) exist everywhere: ask whether they are implemented
    if capability in Method.OPTIONAL_CAPABILITIES:
        return method.can(capability)
    return hasattr(method, capability)


def _split_images(cfg: Config, protocol: str, split: str = "test"):
    ds = load_split(cfg, split, transform=uint8_eval_transform(cfg.data.image_size))
    images, labels = eval_images(ds, cfg.data.image_size)
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"protocol {protocol!r} needs an in-memory {split} set")
    return ds, images, labels


def _finetune_train_set(method: Method, cfg: Config, protocol: str, g: torch.Generator):
    """Training images, labels and the indices a fine-tuning protocol learns from
    (``eval.finetune_subset``): ``finetune_samples`` random images, the method's labelled subset
    (``"labelled"``: the images whose labels pretraining used, ``method.labelled_subset``), or
    the indices of a label-split file."""
    from visrep.data.subsets import read_label_split

    _, x, y = _split_images(cfg, protocol, "train")
    subset = cfg.eval.finetune_subset
    if subset is None:
        return x, y, torch.randperm(len(x), generator=g)[:cfg.eval.finetune_samples]
    if subset == "labelled":
        if not hasattr(method, "labelled_subset"):
            raise ValueError(f"eval.finetune_subset=labelled: {cfg.method.name} trains without a labelled subset "
                             "(give a label-split file, or leave it null)")
        return x, y, method.labelled_subset(y)
    keep = read_label_split(subset)
    if len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= len(x)):
        raise ValueError(f"eval.finetune_subset={subset}: indices outside the {len(x)} training images")
    return x, y, keep


def _method_protocol(protocol: str, method: Method, cfg: Config) -> float | dict[str, float]:
    capability, what = METHOD_PROTOCOLS[protocol]
    if not _supports(method, capability):
        raise ValueError(f"protocol {protocol!r} ({what}) needs a method with {capability}(); "
                         f"{cfg.method.name} has none")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    method.to(device)
    e, g = cfg.eval, torch.Generator().manual_seed(cfg.train.seed)
    ds, images, labels = _split_images(cfg, protocol)
    if protocol == "mrr":
        return method.world_model_mrr(images[:e.mrr_samples], n_candidates=e.mrr_candidates, generator=g)
    if protocol == "predictor_ft":
        x, y, keep = _finetune_train_set(method, cfg, protocol, g)
        return method.predictor_finetune((x[keep], y[keep]), (images, labels), epochs=e.finetune_epochs,
                                         lr=e.finetune_lr, generator=g)
    if protocol == "finetune":
        from visrep.eval.finetune import finetune_encoder

        x, y, keep = _finetune_train_set(method, cfg, protocol, g)
        classes = int(max(y.max(), labels.max())) + 1
        nets = {"pretrained": method.finetune_network()}
        if e.finetune_baseline:
            nets["random init"] = method.random_init_baseline().to(device).finetune_network()
        out = {}
        for name, net in nets.items():
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            out[name] = finetune_encoder(net, net.vit, net.feature_dim, classes, (x[keep], y[keep]), (images, labels),
                                         epochs=e.finetune_epochs, lr=e.finetune_lr, layer_decay=e.finetune_layer_decay,
                                         generator=torch.Generator().manual_seed(seed), device=device,
                                         desc=f"fine-tune ({name})")["top1"]
        return out
    if protocol == "snn":
        _, x, y = _split_images(cfg, protocol, "train")
        return method.snn_accuracy(x, y, images, labels)
    if protocol == "fid":
        from visrep.eval.fid import fid_protocol

        _, x, y = _split_images(cfg, protocol, "train")
        return fid_protocol(method, (x, y), (images, labels), cfg.data.name, n=e.fid_samples, feature=e.fid_feature,
                            weights=e.fid_weights, batch_size=e.batch_size, seed=cfg.train.seed, device=device)
    if protocol == "zeroshot":
        from visrep.eval.zeroshot import DEFAULT_TEMPLATES, zeroshot_classification

        classes = method.data_info.classes or getattr(ds, "classes", None)
        if not classes:
            raise ValueError("zero-shot classification needs class names (the dataset's classes)")
        templates = e.zeroshot_templates or getattr(ds, "templates", None) or DEFAULT_TEMPLATES
        return zeroshot_classification(method, images, labels, classes, templates, batch_size=e.batch_size)
    from visrep.eval.retrieval import image_text_retrieval

    if not hasattr(ds, "captions"):
        raise ValueError("retrieval needs a test set with captions (a captions(index) method)")
    n = min(e.retrieval_samples, len(images))
    return image_text_retrieval(method, images[:n], [ds.captions(i) for i in range(n)], batch_size=e.batch_size)


def export_checkpoint(path: str, out: str, which: str | None = None) -> Path:
    """Write one of the method's exportable modules (``Method.export_modules``; default: the first)
    as safetensors with official key names and the metadata to rebuild it (``hub.load_exported``)."""
    from visrep.hub import export_safetensors

    cfg, method, state = load_trained(path)
    modules = method.export_modules()
    which = which or next(iter(modules))
    if which not in modules:
        raise ValueError(f"{which!r} is not an exportable module of {cfg.method.name}; choose one of {list(modules)}")
    export = modules[which]
    meta = {"method": cfg.method.name, "module": which, "step": state["step"], "image_size": cfg.data.image_size,
            "data_info": method.data_info.to_dict(), **export.metadata}
    return export_safetensors(export.module, out, metadata=meta)


def parse_labels(spec: str | None, classes: Sequence[str] | None) -> list[int] | None:
    """``"3,1,cat"`` -> label ids (class names looked up in ``classes``); None stays None."""
    if not spec:
        return None
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif classes and item in classes:
            out.append(list(classes).index(item))
        else:
            raise ValueError(f"label {item!r} is neither an integer nor a class name"
                             + (f" (classes: {', '.join(classes)})" if classes else ""))
    return out


def sample_checkpoint(path: str, out: str, n: int = 64, labels: str | None = None, seed: int = 0,
                      steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                      nrow: int | None = None) -> Path:
    """Write a PNG grid of ``n`` samples of a generator checkpoint (``Method.sample``). ``labels``: a
    comma list of class ids or names, repeated to ``n`` (default: drawn uniformly); ``steps``,
    ``guidance`` and ``sampler`` override the checkpoint's ``method.sample_steps`` / ``guidance`` /
    ``sampler``."""
    import math

    from torchvision.utils import save_image

    overrides = [f"method.{k}={v}" for k, v in (("sample_steps", steps), ("guidance", guidance), ("sampler", sampler))
                 if v is not None]
    cfg, method, state = load_trained(path, overrides)
    if not method.can("sample"):
        raise ValueError(f"{path}: {cfg.method.name} is not a generative model (no sample())")
    ids = parse_labels(labels, method.data_info.classes)
    label_tensor = torch.tensor([ids[i % len(ids)] for i in range(n)]) if ids else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    images = method.to(device).sample(n, labels=label_tensor, generator=torch.Generator().manual_seed(seed))
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.float() / 255, out_path, nrow=nrow or math.ceil(math.sqrt(n)), padding=1)
    return out_path


# -- demo --------------------------------------------------------------------------------------------
def demo(minutes: float = 10.0, out_dir: str = "runs/demo", data_root: str | None = None,
         overrides: Sequence[str] = (), recipe: str | Path = DEMO_CONFIG) -> dict:
    """Pretrain ``recipe`` (default: I-JEPA on Fashion-MNIST) within ``minutes`` on this machine's
    CPUs, then compare the pretrained encoder, the same encoder at random init and raw pixels on
    k-NN, linear and low-shot."""
    ov = [f"train.max_minutes={minutes}", f"train.out_dir={out_dir}"] + list(overrides)
    if data_root:
        ov.append(f"data.root={data_root}")
    cfg = load_config(recipe, ov)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    method, result = pretrain(cfg, resume=False, fit_schedule_to_budget=True)
    train_minutes = (time.time() - t0) / 60
    method.eval()
    random_init = method.random_init_baseline()
    notes = [
        f"{cfg.method.name} {cfg.model.embed_dim}-d x {cfg.model.depth} ViT, patch {cfg.model.patch_size}, "
        f"{result.step} steps x {cfg.train.batch_size} images ({result.images_per_sec:.0f} img/s, "
        f"stopped by {result.stopped_by}, schedules fitted to {result.total_steps} steps)",
        f"the {minutes:g}-minute budget: training {result.elapsed / 60:.2f} min, step-time calibration "
        f"{result.calibration_seconds:.0f} s (not counted in the budget), set-up (data, model) "
        f"{max(0.0, train_minutes * 60 - result.elapsed - result.calibration_seconds):.0f} s; evaluation follows",
        f"features: {method.feature_description}; random init: same architecture, untrained; "
        "raw pixels: the 784 pixel values in [0, 1]",
    ]
    results, table = evaluate_feature_sets(
        {"pretrained": method.features, "random init": random_init.features, "raw pixels": raw_pixel_features},
        cfg, out_dir, title=f"visrep demo: {cfg.method.name} on {cfg.data.name}", notes=notes)
    (Path(out_dir) / "train_result.json").write_text(json.dumps(
        {"step": result.step, "stopped_by": result.stopped_by, "images_per_sec": result.images_per_sec,
         "train_minutes": train_minutes}, indent=2))
    return results
