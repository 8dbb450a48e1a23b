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
from visrep.data import in_memory
from visrep.data.splits import eval_images, in_memory_split, load_split, uint8_eval_transform
from visrep.data.transforms import dataset_stats
from visrep.errors import WriteError, os_cause
from visrep.eval import protocols as P
from visrep.methods import METHODS, DataInfo, Method, build_method

DEMO_CONFIG = resolve_config(DEMO_RECIPE)


def data_info(cfg: Config, ds) -> DataInfo:
    """What the training set tells the method (saved in every checkpoint)."""
    in_chans = getattr(ds, "in_chans", 3)
    mean, std = dataset_stats(cfg.data.name, in_chans)
    classes = getattr(ds, "classes", None)
    return DataInfo(in_chans=in_chans, image_size=cfg.data.image_size, num_classes=getattr(ds, "num_classes", None),
                    mean=tuple(mean), std=tuple(std), classes=tuple(classes) if classes else None)


# -- pretrain ----------------------------------------------------------------------------------------
def pretrain(cfg: Config, resume: bool | str = False, fit_schedule_to_budget: bool = False, force: bool = False):
    """Pretrain ``cfg.method`` on ``cfg.data``; returns (method, TrainResult). ``force``: start over in a
    ``train.out_dir`` that holds a run (its files move aside, :mod:`visrep.engine.rundir`)."""
    from visrep.engine import train
    from visrep.engine.rundir import existing_run
    from visrep.errors import RunDirectoryError

    METHODS[cfg.method.name].method_class().validate(cfg)  # (load_config did too) before any data is read
    resuming = resume not in (False, None) and (resume != "auto" or (Path(cfg.train.out_dir) / "last.pt").is_file())
    present = existing_run(cfg.train.out_dir)
    if present and not resuming and not force:  # (the trainer decides, under the run's lock) say it before the data
        raise RunDirectoryError(f"{cfg.train.out_dir} already holds a run ({', '.join(present)}); continue it with "
                                "--resume, start over with --force (moves those files into "
                                f"{cfg.train.out_dir}/replaced-<time>/), or choose another train.out_dir")
    train_ds = load_split(cfg, "train")
    eval_ds = None
    if cfg.train.online_knn:
        try:
            eval_ds = load_split(cfg, "test", transform=uint8_eval_transform(cfg.data.image_size))
        except (FileNotFoundError, ValueError):
            eval_ds = None
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every process and every rerun
    method = build_method(cfg, data_info(cfg, train_ds))
    if not (cfg.data.in_memory and in_memory(train_ds)):  # file datasets: views from the full image, in the
        declares_views = any(spec.crops for spec in method.streams().values())  # workers (StreamSpec.crops)
        train_ds.transform = None if declares_views else uint8_eval_transform(cfg.data.image_size)
    result = train(cfg, method, train_ds, eval_data=eval_ds, resume=resume,
                   fit_schedule_to_budget=fit_schedule_to_budget, force=force)
    return method, result


def load_trained(path: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, Method, dict]:
    """Rebuild the method saved in a training checkpoint, weights loaded."""
    from visrep.checkpoint import CheckpointError, load_checkpoint
    from visrep.config import _set_dotted, parse_overrides
    from visrep.engine.trainer import CKPT_FORMAT

    state = load_checkpoint(path)
    if not isinstance(state.get("config"), dict) or "model" not in state:
        keys = ", ".join(map(str, list(state)[:6])) + (", ..." if len(state) > 6 else "")
        raise CheckpointError(f"{path} is not a visrep training checkpoint (no config / model; its keys: {keys}); "
                              "official or bare weights load with visrep.hub.load_official")
    fmt = state.get("format")
    if not isinstance(fmt, int) or not 1 <= fmt <= CKPT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not one this visrep reads (1..{CKPT_FORMAT}); "
                              "it was written by another (newer?) version")
    tree = copy.deepcopy(state["config"])
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    cfg = build_config(tree)
    if "data_info" not in state:
        raise CheckpointError(f"{path} was written by an older visrep (no data_info); retrain or load its "
                              "weights with visrep.hub.load_official")
    method = build_method(cfg, DataInfo.from_dict(state["data_info"]))
    try:
        missing, unexpected = method.load_state_dict(state["model"], strict=False)
    except RuntimeError as e:  # shapes
        raise CheckpointError(f"{path}: its weights do not fit the {cfg.method.name} model its config describes "
                              f"({' '.join(str(e).split())[:400]})") from e
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
        raise CheckpointError(f"{path}: its weights do not fit the {cfg.method.name} model its config describes: "
                              + "; ".join(f"{n} {what} ({few(k)})" for what, k, n in
                                          (("missing", missing, len(missing)), ("unexpected", unexpected,
                                                                                len(unexpected))) if k))
    return cfg, method.eval(), state


# -- evaluation --------------------------------------------------------------------------------------
def _pixel_count(info) -> int:
    return info.in_chans * info.image_size * info.image_size


def raw_pixel_features(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).float() / 255.0


def evaluate_feature_sets(feature_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], cfg: Config,
                          out_dir: str | Path | None = None, title: str = "results", notes: Sequence[str] = ()):
    """Run ``cfg.eval.protocols`` for several feature extractors side by side; print and save the table."""
    from visrep.eval import describe_protocols, extract_features, format_table, run_protocols, save_results

    tf = uint8_eval_transform(cfg.data.image_size)
    train_ds, test_ds = load_split(cfg, "train", transform=tf), load_split(cfg, "test", transform=tf)
    xtr, ytr = eval_images(train_ds, cfg.data.image_size)
    xte, yte = eval_images(test_ds, cfg.data.image_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    feats, notes = {}, list(notes) + describe_protocols(cfg.eval)
    for name, fn in feature_fns.items():
        owner = getattr(fn, "__self__", None)
        per_protocol = {"default": fn}
        if isinstance(owner, Method):
            owner.eval_module().to(device)
            owner.to(device)
            for protocol in cfg.eval.protocols:  # what each protocol reads (Method.probe_features)
                pfn, about = owner.probe_features(protocol) if fn == owner.features else (fn, "")
                if pfn != fn:
                    per_protocol[protocol] = pfn
                    notes.append(f"{name}, {protocol}: {about}")
        done = {}
        for key, f in per_protocol.items():
            desc = name if key == "default" else f"{name} ({key})"
            kw = dict(batch_size=cfg.eval.batch_size, device=device)
            ftr, ltr = extract_features(f, xtr, ytr, desc=f"{desc} train", **kw)
            fte, lte = extract_features(f, xte, yte, desc=f"{desc} test", **kw)
            done[key] = (ftr, ltr, fte, lte)
            if getattr(f, "columns", None) is not None:  # a SweptInput: the probe sweeps its input
                done[key] = dict(zip(("train_feats", "train_labels", "test_feats", "test_labels"), done[key]),
                                 linear_inputs=f.columns)
        feats[name] = done["default"] if len(done) == 1 else done
    results = run_protocols(feats, cfg.eval)
    for name, runs in results["details"].items():  # which swept input each linear probe kept
        for run in runs:
            best = run["result"]["best"] if run["protocol"] == "linear" else {}
            if "input" in best:
                notes.append(f"{name}, linear: kept {best['input']} (validation {best['val_acc']:.1f}; "
                             + ", ".join(f"{k} {v:.1f}" for k, v in run["result"]["inputs"].items()) + ")")
    table = format_table(results, title=title, notes=notes)
    print(table)
    if out_dir is not None:
        save_results(results, table, out_dir)
    return results, table


def evaluate_checkpoint(paths: Sequence[str], protocols: Sequence[str] = ("knn", "linear", "lowshot"),
                        out_dir: str | None = None, data_root: str | None = None, include_raw: bool = False,
                        overrides: Sequence[str] = ()):
    """Evaluate checkpoints side by side: the feature protocols (k-NN, linear, low-shot) in one table,
    every other protocol (:mod:`visrep.eval.protocols`) as a note per checkpoint."""
    method_protocols = [p for p in protocols if p not in P.FEATURE_PROTOCOLS]
    protocols = [p for p in protocols if p in P.FEATURE_PROTOCOLS]
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
        answers = P.available(method)
        for protocol in method_protocols:
            if len(paths) > 1 and protocol not in answers:  # side by side: say n/a, don't fail
                notes.append(f"{name}: {P.describe(protocol, [type(method)])}: n/a ({c.method.name})")
                continue
            extra[(protocol, name)] = P.run(protocol, method, eval_context(c))
            notes.append(f"{name}: {answers[protocol].about}: {P.format_result(extra[(protocol, name)])}")
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


def eval_context(cfg: Config) -> P.EvalContext:
    """The splits (loaded once each), device and seeded generator a protocol runs with."""
    cache: dict = {}

    def split(name: str):
        if name not in cache:
            cache[name] = in_memory_split(cfg, name, f"evaluation on the {name} split")
        return cache[name]

    return P.EvalContext(cfg=cfg, split=split, device="cuda" if torch.cuda.is_available() else "cpu",
                         generator=torch.Generator().manual_seed(cfg.train.seed))


def known_protocols() -> dict[str, str]:
    """Every protocol name -> what it measures (feature, generic and method-declared), for help texts."""
    out = {"knn": "k-NN top-1 (DINO's weighted vote)", "linear": "linear probe top-1",
           "lowshot": "low-shot logistic regression top-1"}
    out.update({k: v.about for k, v in P.GENERIC.items()})
    for name, entry in METHODS.items():
        for k, v in entry.method_class().protocols().items():
            out.setdefault(k, f"{v.about} ({name})")
    return out


def export_checkpoint(path: str, out: str, which: str | None = None, fmt: str = "visrep",
                      heads: bool = False) -> Path:
    """Write one of the method's exportable modules (``Method.export_modules``; default: the first)
    as safetensors with the metadata to rebuild it (``hub.load_exported``), or in another code's layout
    (``fmt``: official / timm / open_clip, :mod:`visrep.formats`; ``heads``: an official layout's heads).
    A failed write raises :class:`~visrep.errors.WriteError` (path, cause, what is intact)."""
    cfg, method, state = load_trained(path)
    modules = method.export_modules()
    which = which or next(iter(modules))
    if which not in modules:
        raise ValueError(f"{which!r} is not an exportable module of {cfg.method.name}; choose one of {list(modules)}")
    export = modules[which]
    out_path = Path(out)
    if fmt == "visrep" and out_path.is_dir():
        raise WriteError(f"{out} is a folder; give the file to write, e.g. {out_path / 'encoder.safetensors'}")
    existed = out_path.exists()
    try:
        return _export(export, cfg, method, state, which, out, fmt, heads)
    except OSError as e:
        raise WriteError(f"{os_cause(e)} while writing {out}; "
                         + ("the file already there is intact" if fmt == "visrep" and existed
                            else "nothing was written" if fmt == "visrep" else "the export may be incomplete")) from e


def _export(export, cfg, method, state, which, out, fmt, heads) -> Path:
    from visrep.formats import export_format
    from visrep.hub import export_safetensors

    if fmt != "visrep":
        info = method.data_info
        return export_format(export.module, export.metadata, fmt, out, method=method, heads=heads,
                             preprocess={"mean": info.mean, "std": info.std}, what=f"{cfg.method.name}'s {which}")
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
    method, result = pretrain(cfg, resume=False, fit_schedule_to_budget=True, force=True)  # a rerun starts over
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
        f"raw pixels: the {_pixel_count(method.data_info)} pixel values of the {method.image_size} px training "
        "images in [0, 1]",
    ]
    results, table = evaluate_feature_sets(
        {"pretrained": method.features, "random init": random_init.features, "raw pixels": raw_pixel_features},
        cfg, out_dir, title=f"visrep demo: {cfg.method.name} on {cfg.data.name}", notes=notes)
    (Path(out_dir) / "train_result.json").write_text(json.dumps(
        {"step": result.step, "stopped_by": result.stopped_by, "images_per_sec": result.images_per_sec,
         "train_minutes": train_minutes, "health": result.health, "features": method.feature_description,
         "lowshot_variant": cfg.eval.lowshot_variant}, indent=2))
    return results
