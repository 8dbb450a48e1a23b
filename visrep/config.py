"""Typed run configuration: dataclasses per section, loaded from YAML, overridden by ``key=value``.

Sections: ``data``, ``model``, ``method``, ``optim``, ``train``, ``eval``. The ``method`` section's
type depends on ``method.name`` (each method module defines its own dataclass). An unknown key or a
value of the wrong type fails at start with the key's full dotted name and what is allowed.
"""
from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from visrep.errors import ConfigError  # noqa: F401 -- re-exported: `from visrep.config import ConfigError`
from visrep.registry import METHODS


@dataclass
class DataConfig:
    name: Literal["fashion_mnist", "cifar10", "cifar100", "imagefolder", "procedural", "coco_captions", "csv_captions",
                  "wds_captions"] = "fashion_mnist"
    root: str | None = None          # must hold the data; unset: the Debian path, else download
    download: bool = False              # torchvision download when online
    image_size: int = 28                # training / evaluation resolution
    num_workers: int = 0
    pin_memory: bool | None = None   # None: on when training on CUDA
    in_memory: bool = True              # use the batched in-memory path when the dataset allows it
    train_subset: int | None = None  # use only the first N training images (quick runs)
    subset_file: str | None = None   # train on the listed images only (indices or paths; `visrep curate`)
    caption_templates: list[str] | None = None  # captions from class names ("a photo of a {}.") for labelled data
    long_tail_ratio: float | None = None  # keep a long-tailed subset of the training set (e.g. 100)
    long_tail_profile: Literal["power", "exponential"] = "power"


@dataclass
class ModelConfig:
    arch: Literal["vit"] = "vit"
    patch_size: int = 4
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pos_embed: Literal["sincos", "learned"] = "sincos"
    class_token: bool = False
    num_registers: int = 0
    drop_path_rate: float = 0.0
    init_values: float | None = None  # LayerScale (DINOv2); None: off
    patch_init: Literal["trunc_normal", "xavier"] = "trunc_normal"  # official I-JEPA: trunc_normal(0.02)
    grad_checkpointing: bool = False  # recompute block activations in backward (encoders and predictors;
                                      # combines with train.parallel=fsdp)
    ffn: Literal["mlp", "swiglu"] = "mlp"  # swiglu: DINOv2's fused SwiGLU (ViT-L/14, g/14 training configs)
    pixel_permutation: int | None = None  # locality control: a fixed pixel order (this seed) for every image


@dataclass
class OptimConfig:
    """``null`` values are filled with the named optimizer's defaults when the config is built
    (``visrep.optim.factory.OPTIMIZER_DEFAULTS``): adamw / sgd get the I-JEPA-style schedules
    (warm-up 2e-4 -> 1e-3, cosine to 1e-6, weight decay 0.04 -> 0.4), the critical-gradient
    optimizers their reference defaults (constant lr, no momentum, no weight decay)."""

    name: Literal["adamw", "sgd", "lars", "sgd_c", "adam_c", "rmsprop_c"] = "adamw"
    lr: float | None = None       # peak lr (scaled linearly with batch size if lr_batch_ref is set)
    start_lr: float | None = None  # warmup starts here (null: the optimizer's default, else lr)
    final_lr: float | None = None
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    final_weight_decay: float | None = None  # cosine weight-decay schedule end (null: constant)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float | None = None  # SGD / LARS / SGD_C / RMSprop_C momentum
    nesterov: bool = False           # SGD / SGD_C: Nesterov momentum
    dampening: float = 0.0           # SGD / SGD_C
    amsgrad: bool = False            # AdamW / Adam_C
    alpha: float = 0.99              # RMSprop_C: smoothing of the squared-gradient average
    centered: bool = False           # RMSprop_C: centred (variance) normalisation
    lars_eta: float = 0.001          # LARS trust coefficient (PAWS)
    eps: float = 1e-8
    ipe_scale: float = 1.0           # schedule horizon multiplier (MSN uses 1.25)
    schedule_offset: int | None = None  # step i uses the schedules at i + offset; null: the method's official
                                     # convention (Method.schedule_offset: 1 I-JEPA/MSN/StoP, 0 PAWS)
    clip_grad: float | None = None
    lr_batch_ref: int | None = None  # lr is given for this global batch size; scaled with the rule below
    lr_batch_scaling: Literal["linear", "sqrt"] = "linear"  # x (batch / ref), or x sqrt(batch / ref) (DINOv2)
    # critical-gradient optimizers (optim.name ends with _c)
    topc: int = 10
    decay: float = 0.7
    kappa: float = 1.0
    aggr: str | None = None       # None: the optimizer's default ('sum' for SGD_C, 'mean' otherwise)
    reference_compat: bool = False


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 256            # per process
    max_minutes: float | None = None
    max_steps: int | None = None
    seed: int = 0
    out_dir: str = "runs/default"
    ckpt_every: int = 500            # steps; a checkpoint is also written at the end
    log_every: int = 10
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool | None = None      # torch.compile the step; None: on for CUDA, off on CPU (measured: no
                                     # gain there after minutes of compiling); falls back to eager on failure
    compile_backend: str = "inductor"
    device: str = "auto"
    online_knn: bool = False         # k-NN on a held-out subset every epoch
    online_knn_samples: int = 5000
    threads: int | None = None    # torch.set_num_threads
    progress: bool = True
    plot: bool = True                # train.png (loss terms, lr, health) in out_dir at the end (with matplotlib)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # with several processes: DDP (replicated) or FSDP2 (fully_shard:
                                     # each trained transformer block a unit, then the method; EMA teachers
                                     # replicated; checkpoints in DDP's format); see visrep/engine/fsdp.py


@dataclass
class EvalConfig:
    protocols: list[str] = field(default_factory=lambda: ["knn", "linear", "lowshot"])
    batch_size: int = 512
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # DINO / DINOv2 knn.py (cosine,
                                     # T 0.07, weighted vote); a k above the training-set size is left out
    knn_temperature: float = 0.07
    linear_epochs: int = 20
    # DINOv2's linear probe (eval/linear.py): one classifier per (the [CLS] of the last n blocks, with or
    # without the patch average) pair, the best on validation kept; n above the depth is the depth
    probe_blocks: list[int] = field(default_factory=lambda: [1, 4])
    probe_avgpool: list[bool] = field(default_factory=lambda: [False, True])
    lowshot_shots: list[int] = field(default_factory=lambda: [1, 2, 5])
    lowshot_fraction: float = 0.01
    lowshot_seeds: int = 3
    # logistic_eval: MSN's logistic_eval.py (rows centred + normalised, no bias, lambda 2.5e-4 / N; "msn" in
    # configs saved before is read as this); visrep: column-centred, bias, l2 1e-4
    lowshot_variant: Literal["logistic_eval", "visrep"] = "logistic_eval"
    lowshot_solver: Literal["auto", "cyanure", "lbfgs"] = "auto"  # logistic_eval: cyanure when installed
    finetune_epochs: int = 10        # predictor fine-tuning (world models): epochs over finetune_samples
    finetune_samples: int = 10000    # labelled training images it uses (the test split is used whole)
    finetune_lr: float = 1.0e-3      # head and random predictor; a pretrained predictor gets 1/10
    finetune_layer_decay: float = 0.75  # protocol "finetune": layer-wise lr decay of the encoder
    finetune_baseline: bool = True   # protocol "finetune": also fine-tune the random-init encoder
    finetune_subset: str | None = None  # finetune / predictor_ft training images: null = finetune_samples
                                     # random ones; "labelled" = the method's labelled subset (PAWS: the
                                     # images its supports came from); else a label-split file
    zeroshot_templates: list[str] | None = None  # prompt templates ("a photo of a {}."); null: the dataset's
    retrieval_samples: int = 1000    # test images (with all their captions) used for retrieval
    fid_samples: int = 1000          # FID of generators: this many samples vs this many test images
    fid_feature: Literal["domain", "inception"] = "domain"  # domain: a visrep classifier of the dataset
                                     # (a "domain FID", not comparable to published FID); inception: the
                                     # standard Inception-v3 (torch-fidelity, weights present locally)
    fid_weights: str | None = None   # local Inception weights (fid_feature=inception); null: torch's cache


@dataclass
class Config:
    method: Any
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def method_config_classes() -> dict[str, type]:
    """method name -> its config dataclass (imported lazily so configs load fast)."""
    return {name: entry.config_class() for name, entry in METHODS.items()}


# ------------------------------------------------------------------------------------------------
# Parsing and type checking


def _check(value: Any, tp: Any, key: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed; allowed values: {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list ({_name(tp)}), got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values ({_name(tp)}), got {value!r}")
            return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_check(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    return value


def _name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{key}'; allowed keys in '{prefix or 'top level'}': "
                          f"{', '.join(sorted(fields))}")
    kwargs = {k: _check(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix}: {e}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        if node.get(p) is None:  # an empty YAML section ("data:") is an empty mapping
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"cannot set '{dotted}': '{p}' is not a section")
        node = node[p]
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. optim.lr=5e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


# keys that moved from a shared section into the method's own (a protocol's settings live with its
# method): old -> new, applied to configs saved by earlier versions (checkpoints) and old recipes
MOVED_KEYS = {"eval.mrr_candidates": "method.mrr_candidates", "eval.mrr_samples": "method.mrr_samples"}


def _migrate(tree: dict) -> dict:
    """Move the keys of :data:`MOVED_KEYS` (dropped where the run's method has no such setting)."""
    mcls = method_config_classes().get((tree.get("method") or {}).get("name"))
    mfields = {f.name for f in dataclasses.fields(mcls)} if mcls else set()
    for old, new in MOVED_KEYS.items():
        (osec, okey), nkey = old.split("."), new.split(".")[1]
        section = dict(tree.get(osec) or {})
        if okey in section:
            value = section.pop(okey)
            tree[osec] = section
            if nkey in mfields:
                tree["method"] = {nkey: value, **(tree.get("method") or {})}
    ev = tree.get("eval") or {}
    if ev.get("lowshot_variant") == "msn":  # renamed after the protocol's script, not the method
        tree["eval"] = ev = {**ev, "lowshot_variant": "logistic_eval"}
    for key in ("probe_blocks", "probe_avgpool"):  # one value (probe_blocks was one number): a sweep of one
        if isinstance(ev.get(key), (int, bool)):
            tree["eval"] = ev = {**ev, key: [ev[key]]}
    return tree


# ------------------------------------------------------------------------------------------------
# Numeric bounds: checked when the config is built, before any data is read. key -> (low, high,
# which ends are open); a null value passes when the type allows null; a list checks each element.
# 0 stays allowed where it means "off" (ckpt_every, log_every, clip_grad, lowshot_fraction, lr for a
# frozen control run).
_GE0, _GE1, _GT0 = (0, None, ""), (1, None, ""), (0, None, "low")
_UNIT, _UNIT_OPEN = (0, 1, ""), (0, 1, "high")
NUMERIC_BOUNDS: dict[str, tuple[float | None, float | None, str]] = {
    "data.image_size": _GE1, "data.num_workers": _GE0, "data.train_subset": _GE1, "data.long_tail_ratio": (1, None, ""),
    "model.patch_size": _GE1, "model.embed_dim": _GE1, "model.depth": _GE1, "model.num_heads": _GE1,
    "model.mlp_ratio": _GT0, "model.num_registers": _GE0, "model.drop_path_rate": _UNIT_OPEN,
    "model.init_values": _GT0,
    "optim.lr": _GE0, "optim.start_lr": _GE0, "optim.final_lr": _GE0, "optim.warmup_epochs": _GE0,
    "optim.weight_decay": _GE0, "optim.final_weight_decay": _GE0, "optim.betas": _UNIT_OPEN, "optim.momentum": _UNIT,
    "optim.lars_eta": _GT0, "optim.eps": _GT0, "optim.ipe_scale": _GT0, "optim.schedule_offset": _GE0,
    "optim.clip_grad": _GE0, "optim.lr_batch_ref": _GE1, "optim.topc": _GE1, "optim.decay": _UNIT,
    "optim.kappa": _GE0,
    "train.epochs": _GE1, "train.batch_size": _GE1, "train.max_minutes": _GT0, "train.max_steps": _GE1,
    "train.ckpt_every": _GE0, "train.log_every": _GE0, "train.online_knn_samples": _GE1, "train.threads": _GE1,
    "eval.batch_size": _GE1, "eval.knn_k": _GE1, "eval.knn_temperature": _GT0, "eval.linear_epochs": _GE1,
    "eval.probe_blocks": _GE1, "eval.lowshot_shots": _GE1, "eval.lowshot_fraction": _UNIT,
    "eval.lowshot_seeds": _GE1, "eval.finetune_epochs": _GE0, "eval.finetune_samples": _GE1, "eval.finetune_lr": _GT0,
    "eval.finetune_layer_decay": (0, 1, "low"), "eval.retrieval_samples": _GE1, "eval.fid_samples": _GE1,
}


def _allowed(low, high, open_: str) -> str:
    lo = None if low is None else (f"> {low}" if "low" in open_ else f">= {low}")
    hi = None if high is None else (f"< {high}" if "high" in open_ else f"<= {high}")
    return " and ".join(x for x in (lo, hi) if x)


def check_numbers(cfg: Config, bounds: dict | None = None) -> None:
    """Raise :class:`ConfigError` for the first value outside :data:`NUMERIC_BOUNDS` (key, value, what is
    allowed); ``train.max_steps`` / ``train.max_minutes`` that would train nothing included."""
    for key, (low, high, open_) in (bounds or NUMERIC_BOUNDS).items():
        section, name = key.split(".", 1)
        value = getattr(getattr(cfg, section), name, None)
        for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            bad = (v != v or (low is not None and (v <= low if "low" in open_ else v < low))
                   or (high is not None and (v >= high if "high" in open_ else v > high)))
            if bad:
                where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
                hint = ("; a run must train at least one step" if key in ("train.max_steps", "train.max_minutes",
                                                                          "train.epochs") else "")
                raise ConfigError(f"{where}: {v!r} is not allowed; it must be {_allowed(low, high, open_)}{hint}")


def build_config(tree: dict) -> Config:
    tree = _migrate(dict(tree))
    sections = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(tree) - sections)
    if unknown:
        raise ConfigError(f"unknown config section '{unknown[0]}'; allowed sections: {', '.join(sorted(sections))}")
    method_tree = dict(tree.get("method") or {})
    classes = method_config_classes()
    name = method_tree.get("name")
    if name not in classes:
        raise ConfigError(f"method.name: {name!r} is not a known method; allowed: {', '.join(sorted(classes))}")
    hints = typing.get_type_hints(Config)
    kwargs = {"method": _build(classes[name], method_tree, "method")}
    for section in sections - {"method"}:
        kwargs[section] = _check(tree.get(section) or {}, hints[section], section)
    from visrep.optim.factory import resolve_optim_defaults

    kwargs["optim"] = resolve_optim_defaults(kwargs["optim"])
    cfg = Config(**kwargs)
    check_numbers(cfg)  # before any data is read
    METHODS[name].method_class().validate(cfg)  # reject a bad config before any data is read
    return cfg


CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# the recipe `visrep demo` runs unless told another (``--recipe``)
DEMO_RECIPE = "ijepa/fashion_mnist_demo"


def resolve_config(name: str | Path) -> Path:
    """A path, or a name under the packaged ``visrep/configs`` (``ijepa/fashion_mnist_demo``)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    available = sorted(str(c.relative_to(CONFIG_DIR)) for c in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found; give a YAML path or one of: {', '.join(available)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Load ``path`` (a YAML file or a packaged recipe name), apply ``key=value`` overrides, type-check
    everything."""
    tree: dict = dict(base or {})
    if path is not None:
        p = resolve_config(path)
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = _merge(tree, loaded)
    parsed = parse_overrides(overrides or [])
    new_opt = next((v for k, v in parsed if k == "optim.name"), None)
    old_opt = (tree.get("optim") or {}).get("name", "adamw")
    if new_opt is not None and new_opt != old_opt and tree.get("optim"):
        # another optimizer: the recipe's settings were tuned for its own; start from the new one's
        dropped = sorted(k for k in tree["optim"] if k != "name")
        if dropped:
            warnings.warn(f"optim.name={new_opt} replaces the recipe's {old_opt}: its optim settings "
                          f"({', '.join(dropped)}) are not carried over; set them with optim.<key>=...",
                          stacklevel=2)
        tree["optim"] = {}
    for key, value in parsed:
        _set_dotted(tree, key, value)
    return build_config(tree)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
