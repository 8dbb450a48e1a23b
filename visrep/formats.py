"""Our weights in other codes' layouts, and back: ``official`` (each method's official repository),
``timm`` (``timm.models.VisionTransformer``) and ``open_clip`` (``open_clip.CLIP``).

Each converter is a pair of pure key/tensor maps (ours -> theirs, theirs -> ours) over state dicts;
:func:`write` puts one on disk as the target code reads it: ``official`` a checkpoint file (``.pth``
pickle, or ``.safetensors`` with nested entries joined by ``.``), ``timm`` a folder with
``model.safetensors`` + ``config.json`` (``timm.create_model("local-dir:OUT", pretrained=True)``),
``open_clip`` a folder with ``open_clip_model.safetensors`` + ``open_clip_config.json``
(``open_clip.create_model_and_transforms("local-dir:OUT")``). A method names the formats of each
exported module in ``Export.metadata["formats"]`` (:func:`declare`): format -> layout and the method's
attributes the layout reads besides the module (heads, prototypes, towers). Details: docs/formats.md.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .utils import atomic_path

FORMATS = ("visrep", "official", "timm", "open_clip")
_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1280: "huge", 1408: "giant", 1536: "giant"}


def declare(**formats: str | dict | None) -> dict:
    """``Export`` metadata naming the layouts of a module: ``declare(official="dinov2", timm="vit")`` or a
    spec ``{"layout": ..., "parts": {role: method attribute}, ...}``; None entries are left out."""
    return {"formats": {f: s if isinstance(s, dict) else {"layout": s} for f, s in formats.items() if s}}


def available(metadata: dict) -> list[str]:
    """The formats an export can be written in (``visrep`` always)."""
    return ["visrep", *metadata.get("formats", {})]


# ----------------------------------------------------------------------------- ViT: timm
def _ratio(hidden: int, dim: int) -> float:
    r = hidden / dim
    return r if int(dim * r) == hidden else (hidden + 0.5) / dim


def timm_name(arch: dict) -> str:
    """A registered timm architecture for one of our ViTs (model_args override every size)."""
    import timm

    size, p = _SIZES.get(arch["embed_dim"], "base"), arch["patch_size"]
    if arch.get("mask_token") or arch.get("ffn") == "swiglu" or arch.get("init_values") is not None:
        reg = "_reg4" if arch.get("num_registers") else ""
        size = "giant" if arch.get("ffn") == "swiglu" else size
        cands = [f"vit_{size}_patch14{reg}_dinov2", f"vit_small_patch14{reg}_dinov2"]
    elif arch.get("class_token"):
        cands = [f"vit_{size}_patch{p}_224", "vit_base_patch16_224"]
    else:
        cands = [f"vit_{size}_patch{p}_gap_224", "vit_huge_patch14_gap_224"]
    return next(n for n in cands if timm.is_model(n))


def timm_from_ours(state: dict[str, Tensor], arch: dict) -> tuple[dict[str, Tensor], dict]:
    """Our ViT -> timm ``VisionTransformer``: ``(state, model_args)``. The DINOv2 mask token is dropped;
    registers become ``reg_token`` with ``no_embed_class`` (the [CLS] keeps its position row folded in,
    as timm's DINOv2 conversion); a fixed sin-cos table becomes timm's ``pos_embed``."""
    problems = [f"{k}={arch.get(k)!r}" for k, ok in (("norm_eps", 1e-6), ("pre_norm", False), ("act_layer", "gelu"),
                                                      ("patch_bias", True), ("register_pos", False),
                                                      ("pixel_permutation", None)) if arch.get(k, ok) != ok]
    if problems:
        raise ValueError(f"timm's VisionTransformer cannot express this ViT ({', '.join(problems)})")
    out = {k: v for k, v in state.items() if k != "mask_token"}
    regs = arch.get("num_registers", 0)
    if regs:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    img = arch["img_size"]
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    args = dict(img_size=img if isinstance(img, int) else list(img), patch_size=arch["patch_size"],
                in_chans=arch["in_chans"], embed_dim=arch["embed_dim"], depth=arch["depth"],
                num_heads=arch["num_heads"], mlp_ratio=_ratio(hidden, arch["embed_dim"]), qkv_bias=arch["qkv_bias"],
                class_token=bool(arch["class_token"]), global_pool="token" if arch["class_token"] else "avg",
                fc_norm=False, reg_tokens=regs, no_embed_class=bool(regs), init_values=arch.get("init_values"),
                num_classes=0)
    return out, args


def ours_from_timm(state: dict[str, Tensor], model_args: dict) -> tuple[dict[str, Tensor], dict]:
    """timm ``VisionTransformer`` -> our ViT: ``(state, constructor overrides)`` (the reverse of
    :func:`timm_from_ours`; a folded [CLS] position stays in the token, the row is zero)."""
    out = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm."))}
    if "reg_token" in out:
        out["register_tokens"] = out.pop("reg_token")
    if model_args.get("no_embed_class") and "cls_token" in out:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    if model_args.get("mlp_layer") or any(".mlp.fc1_g." in k for k in out):
        raise ValueError("timm's unpacked SwiGLU is not our ViT's layout")
    over = dict(pos_embed="learned", norm_eps=1e-6)
    if "init_values" in model_args and model_args["init_values"] is not None:
        over["init_values"] = model_args["init_values"]
    return out, over


# ----------------------------------------------------------------------------- DINOv2
def dinov2_from_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our DINOv2 backbone -> the official ``DinoVisionTransformer`` keys (SwiGLU ``mlp.fc1/fc2`` ->
    ``mlp.w12/w3``; every other name is already theirs)."""
    return {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.") if _swiglu(state) else k: v
            for k, v in state.items()}


def _swiglu(state: dict[str, Tensor]) -> bool:
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def ours_from_dinov2(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in state.items()}


# ----------------------------------------------------------------------------- MAE (models_mae.py)
_MAE_DECODER = (("predictor_embed.", "decoder_embed."), ("predictor_blocks.", "decoder_blocks."),
                ("predictor_norm.", "decoder_norm."), ("predictor_proj.", "decoder_pred."),
                ("mask_token", "mask_token"), ("predictor_pos_embed", "decoder_pos_embed"))


def mae_from_ours(encoder: dict[str, Tensor], decoder: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our MAE encoder + decoder -> the official ``MaskedAutoencoderViT`` state dict (its decoder
    position table has a [CLS] row: zeros, as the official sin-cos table with ``cls_token=True``)."""
    if "cls_token" not in encoder:
        raise ValueError("the official MaskedAutoencoderViT has a [CLS] token; this encoder has none "
                         "(model.class_token=false): export it as timm or visrep")
    out = dict(encoder)
    for k, v in decoder.items():
        for ours, theirs in _MAE_DECODER:
            if k.startswith(ours):
                k = theirs + k[len(ours):]
                break
        if k == "decoder_pos_embed":
            v = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)
        out[k] = v
    return out


def ours_from_mae(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The official ``MaskedAutoencoderViT`` state -> ``(encoder, decoder)`` states of ours."""
    enc, dec = {}, {}
    for k, v in state.items():
        for ours, theirs in _MAE_DECODER:
            if k.startswith(theirs):
                dec[ours + k[len(theirs):]] = v[:, 1:] if theirs == "decoder_pos_embed" else v
                break
        else:
            enc[k] = v
    return enc, dec


# ----------------------------------------------------------------------------- CLIP / open_clip / Llip
_CLIP_BLOCK = (("norm1.", "ln_1."), ("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
               ("attn.proj.", "attn.out_proj."), ("norm2.", "ln_2."), ("mlp.fc1.", "mlp.c_fc."),
               ("mlp.fc2.", "mlp.c_proj."))


def _block_to_clip(key: str) -> str:
    index, name = key[len("blocks."):].split(".", 1)
    for ours, theirs in _CLIP_BLOCK:
        if name.startswith(ours):
            name = theirs + name[len(ours):]
            break
    return f"transformer.resblocks.{index}.{name}"


def clip_vision_from_ours(state: dict[str, Tensor], proj: Tensor | None = None) -> dict[str, Tensor]:
    """Our CLIP / Llip vision tower -> the official ``VisualTransformer`` keys (the reverse of
    :func:`visrep.hub.clip_vision_state`): ``cls_token`` -> 1-D ``class_embedding``, Llip's mixture
    ``register_tokens`` -> 2-D ``class_embedding``, ``norm_pre`` / ``norm`` -> ``ln_pre`` / ``ln_post``."""
    out = {}
    for k, v in state.items():
        if k == "patch_embed.proj.weight":
            out["conv1.weight"] = v
        elif k == "cls_token":
            out["class_embedding"] = v.reshape(-1)
        elif k == "register_tokens":
            out["class_embedding"] = v.reshape(-1, v.shape[-1])
        elif k == "pos_embed":
            out["positional_embedding"] = v.squeeze(0)
        elif k.startswith("norm_pre."):
            out["ln_pre." + k[len("norm_pre."):]] = v
        elif k.startswith("norm."):
            out["ln_post." + k[len("norm."):]] = v
        elif k.startswith("blocks."):
            out[_block_to_clip(k)] = v
        else:
            raise KeyError(f"no CLIP name for our vision-tower key {k!r}")
    if proj is not None:
        out["proj"] = proj
    return out


def clip_text_from_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our :class:`TextTransformer` -> CLIP's / open_clip's text-tower keys."""
    return {(_block_to_clip(k) if k.startswith("blocks.") else k): v for k, v in state.items()}


def open_clip_from_ours(visual: dict[str, Tensor], text: dict[str, Tensor], image_projection: Tensor,
                        logit_scale: Tensor, logit_bias: Tensor | None = None) -> dict[str, Tensor]:
    """Our CLIP / SigLIP towers -> an ``open_clip.CLIP`` state dict (``visual.*``, text tower at the
    top level, ``logit_scale``, SigLIP's ``logit_bias``)."""
    out = {f"visual.{k}": v for k, v in clip_vision_from_ours(visual, image_projection).items()}
    out.update(clip_text_from_ours(text))
    out["logit_scale"] = logit_scale.reshape(())
    if logit_bias is not None:
        out["logit_bias"] = logit_bias.reshape(())
    return out


def open_clip_config(visual_arch: dict, text_arch: dict, siglip: bool) -> dict:
    """open_clip's ``model_cfg`` for our towers (QuickGELU as ours: ``quick_gelu``)."""
    img = visual_arch["img_size"]
    return {"embed_dim": text_arch["embed_dim"], "quick_gelu": visual_arch["act_layer"] == "quick_gelu",
            "vision_cfg": {"image_size": img if isinstance(img, int) else list(img), "layers": visual_arch["depth"],
                           "width": visual_arch["embed_dim"],
                           "head_width": visual_arch["embed_dim"] // visual_arch["num_heads"],
                           "mlp_ratio": visual_arch["mlp_ratio"], "patch_size": visual_arch["patch_size"]},
            "text_cfg": {"context_length": text_arch["context_length"], "vocab_size": text_arch["vocab_size"],
                         "width": text_arch["width"], "heads": text_arch["num_heads"], "layers": text_arch["depth"],
                         "mlp_ratio": text_arch["mlp_ratio"]},
            **({"init_logit_bias": -10.0} if siglip else {})}


_CMP_MIXER = {"k_proj": "k_proj", "v_proj": "v_proj", "q_proj": "q_proj", "out_proj": "pred.out_proj"}


def cmp_from_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our :class:`visrep.methods.llip.Llip` state -> the official Llip ``CMP`` state dict (the reverse
    of :func:`visrep.hub.llip_state`; CMP's tower has no ``proj``)."""
    out = {f"visual.{k}": v for k, v in clip_vision_from_ours(
        {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}).items()}
    out.update(clip_text_from_ours({k[len("text."):]: v for k, v in state.items() if k.startswith("text.")}))
    for k, v in state.items():
        if k.startswith("mixer."):
            name = k[len("mixer."):]
            out[_CMP_MIXER.get(name, name)] = v
        elif k in ("logit_scale", "logit_bias"):
            out[k] = v
    return out


# ----------------------------------------------------------------------------- writing
def _flatten(tree: dict, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cpu(tree: dict) -> dict:
    return {k: _cpu(v) if isinstance(v, dict) else v.detach().contiguous().cpu() for k, v in tree.items()}


def _save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(_cpu(state), tmp, metadata=meta)


def _save_json(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2) + "\n")


def write_official(tree: dict, path: str | os.PathLike) -> Path:
    """An official checkpoint: a ``.pth`` / ``.pt`` pickle of ``tree`` as the official code saves it, or
    ``.safetensors`` with nested entries joined by ``.`` (``teacher.backbone.cls_token``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        _save_safetensors(_flatten(tree), path)
    else:
        with atomic_path(path) as tmp:
            torch.save(_cpu(tree), tmp)
    return path


def write_timm(state: dict[str, Tensor], model_args: dict, out: str | os.PathLike, preprocess: dict,
               name: str) -> Path:
    """A timm model folder: ``model.safetensors`` (its metadata holds the ``pretrained_cfg`` too) and
    ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``: mean, std, input size,
    ``num_classes=0``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img = model_args["img_size"]
    hw = [img, img] if isinstance(img, int) else list(img)
    pretrained_cfg = {"architecture": name, "input_size": [model_args["in_chans"], *hw], "fixed_input_size": True,
                      "interpolation": "bicubic", "crop_pct": preprocess.get("crop_pct", 0.875),
                      "mean": list(preprocess["mean"]), "std": list(preprocess["std"]), "num_classes": 0,
                      "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head"}
    cfg = {"architecture": name, "num_classes": 0, "num_features": model_args["embed_dim"],
           "global_pool": model_args["global_pool"], "model_args": model_args, "pretrained_cfg": pretrained_cfg}
    _save_safetensors(state, out / "model.safetensors", {"pretrained_cfg": pretrained_cfg, "architecture": name,
                                                         "model_args": model_args})
    _save_json(cfg, out / "config.json")
    return out


def write_open_clip(state: dict[str, Tensor], model_cfg: dict, out: str | os.PathLike, preprocess: dict) -> Path:
    """An open_clip model folder: ``open_clip_model.safetensors`` + ``open_clip_config.json``
    (``model_cfg``, ``preprocess_cfg``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(preprocess["mean"]),
                                                      "std": list(preprocess["std"]),
                                                      "size": model_cfg["vision_cfg"]["image_size"]}}
    _save_safetensors(state, out / "open_clip_model.safetensors")
    _save_json(cfg, out / "open_clip_config.json")
    return out


# ----------------------------------------------------------------------------- export dispatch
def _part(method: nn.Module, name: str) -> Any:
    obj: Any = method
    for attr in name.split("."):
        obj = obj[attr] if isinstance(obj, nn.ModuleDict) else getattr(obj, attr)
    return obj


def _sd(obj: Any) -> dict[str, Tensor]:
    return obj.state_dict() if isinstance(obj, nn.Module) else obj


def export_format(module: nn.Module, metadata: dict, fmt: str, out: str | os.PathLike, method: nn.Module | None = None,
                  heads: bool = False, preprocess: dict | None = None, what: str = "this module") -> Path:
    """Write ``module`` (an export of ``method`` with its ``Export.metadata``) in format ``fmt`` at
    ``out``; ``heads=True`` adds the heads / prototypes an official layout holds (MSN, DINOv2).
    ``preprocess``: ``mean``, ``std`` (timm's ``pretrained_cfg``, open_clip's ``preprocess_cfg``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    specs = metadata.get("formats", {})
    if fmt not in specs:
        raise ValueError(f"{what} has no {fmt!r} format; it exports as: {', '.join(available(metadata))}")
    spec, parts = specs[fmt], {}
    for role, attr in spec.get("parts", {}).items():
        if method is None:
            raise ValueError(f"the {fmt!r} layout of {what} needs the method's {attr!r}")
        parts[role] = _part(method, attr)
    preprocess = {"mean": (0.5,), "std": (0.5,), **(preprocess or {})}
    state, layout, arch = module.state_dict(), spec["layout"], metadata.get("arch", {})
    if fmt == "timm":
        tstate, args = timm_from_ours(state, arch)
        return write_timm(tstate, args, out, preprocess, timm_name(arch))
    if fmt == "open_clip":
        bias = parts.get("logit_bias")
        ostate = open_clip_from_ours(state, _sd(parts["text"]), parts["image_projection"].detach(),
                                     parts["logit_scale"].detach(), None if bias is None else bias.detach())
        cfg = open_clip_config(arch, parts["text"].arch, siglip=bias is not None)
        return write_open_clip(ostate, cfg, out, preprocess)
    # official layouts
    if layout == "vit":                               # I-JEPA, StoP: encoder / predictor keys are theirs
        tree: dict = dict(state)
    elif layout == "dinov2":
        tree = dinov2_from_ours(state)
        if heads:
            tree = {"teacher": {**{f"backbone.{k}": v for k, v in tree.items()},
                                **{f"{h}.{k}": v for h in ("dino_head", "ibot_head") if h in parts
                                   for k, v in _sd(parts[h]).items()}}}
    elif layout == "msn":                             # src/deit.py; the projection head is the encoder's fc
        tree = dict(state)
        if heads:
            tree = {spec.get("entry", "target_encoder"): {**tree, **{f"fc.{k}": v for k, v in
                                                                     _sd(parts["head"]).items()}},
                    "prototypes": parts["prototypes"].detach()}
    elif layout == "mae":
        tree = mae_from_ours(state, _sd(parts["decoder"]))
    elif layout == "dit":
        tree = dict(state)
    elif layout == "cmp":
        tree = cmp_from_ours(_sd(method))
    else:
        raise ValueError(f"unknown official layout {layout!r}")
    return write_official(tree, out)


__all__ = ["FORMATS", "available", "clip_text_from_ours", "clip_vision_from_ours", "cmp_from_ours", "declare",
           "dinov2_from_ours", "export_format", "mae_from_ours", "open_clip_config", "open_clip_from_ours",
           "ours_from_dinov2", "ours_from_mae", "ours_from_timm", "timm_from_ours", "timm_name", "write_official",
           "write_open_clip", "write_timm"]
