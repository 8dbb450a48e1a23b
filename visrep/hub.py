"""Official checkpoints in, safetensors out.

Our ViT and predictor use the official parameter names, so mapping a checkpoint is mostly
unwrapping: official I-JEPA checkpoints hold ``{"encoder", "predictor", "target_encoder", ...}``
with DDP's ``module.`` prefix; DINOv2 backbones are plain state dicts (sometimes prefixed
``backbone.`` / ``teacher.backbone.``). The architecture is read off the tensors' shapes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .models import HEADS_BY_DIM, DiT, Predictor, VisionTransformer
from .models.presets import clip_vit, dinov2_vit, ijepa_predictor, ijepa_vit
from .models.text import TextTransformer
from .models.wide_resnet import WideResNet
from .utils import atomic_path

__all__ = ["load_official", "load_exported", "vit_from_state_dict", "ijepa_vit", "dinov2_vit", "ijepa_predictor",
           "export_safetensors", "strip_prefixes", "HEADS_BY_DIM", "REBUILDABLE", "clip_vit", "clip_vision_state",
           "clip_text_state", "llip_state", "open_clip_towers", "load_format", "dit_from_state_dict"]

# classes an export can name in its metadata ("class"), rebuilt from the recorded ``arch``
REBUILDABLE: dict[str, type[nn.Module]] = {"VisionTransformer": VisionTransformer, "Predictor": Predictor,
                                           "TextTransformer": TextTransformer, "DiT": DiT,
                                           "WideResNet": WideResNet}
_PREFIXES = ("module.", "backbone.", "teacher.backbone.", "student.backbone.", "_orig_mod.")


def strip_prefixes(state: dict[str, Tensor], prefixes=_PREFIXES) -> dict[str, Tensor]:
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _depth(state: dict[str, Tensor], prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def vit_from_state_dict(state: dict[str, Tensor], num_heads: int | None = None, img_size: int | None = None,
                        strict: bool = True, **overrides: Any) -> VisionTransformer:
    """Build our ViT with the architecture a (prefix-free) official state dict implies, and load it.
    DINOv2's SwiGLU FFN (``mlp.w12`` / ``mlp.w3``, ViT-g/14) becomes ``ffn="swiglu"`` (``mlp.fc1`` / ``fc2``)."""
    swiglu = any(".mlp.w12." in k for k in state)
    if swiglu:
        state = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in state.items()}
    w = state["patch_embed.proj.weight"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    class_token = "cls_token" in state
    n_patches = state["pos_embed"].shape[1] - int(class_token)
    side = int(round(n_patches ** 0.5))
    if num_heads is None:
        if dim not in HEADS_BY_DIM:
            raise ValueError(f"cannot infer num_heads for width {dim}; pass num_heads=")
        num_heads = HEADS_BY_DIM[dim]
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    mlp_ratio = hidden / dim
    if swiglu:  # the ratio whose SwiGLU rounding gives this width (4 for every official model)
        mlp_ratio = next(r for r in (4.0, 3 * hidden / (4 * dim), 8 / 3)
                         if (int(dim * r * 2 / 3) + 7) // 8 * 8 == hidden // 2)
    kwargs = dict(
        img_size=img_size or side * patch, patch_size=patch, in_chans=in_chans, embed_dim=dim,
        depth=_depth(state, "blocks."), num_heads=num_heads, mlp_ratio=mlp_ratio, ffn="swiglu" if swiglu else "mlp",
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        pos_embed="learned" if class_token else "sincos",
        class_token=class_token,
        num_registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
        mask_token="mask_token" in state,
        init_values=1.0 if "blocks.0.ls1.gamma" in state else None,
    )
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs).to(w.dtype)
    model.load_state_dict(state, strict=strict)
    return model


# official CLIP / open_clip / Llip residual-block names -> ours (timm Block)
_CLIP_BLOCK = (("ln_1.", "norm1."), ("attn.in_proj_weight", "attn.qkv.weight"), ("attn.in_proj_bias", "attn.qkv.bias"),
               ("attn.out_proj.", "attn.proj."), ("ln_2.", "norm2."), ("mlp.c_fc.", "mlp.fc1."),
               ("mlp.c_proj.", "mlp.fc2."))


def _clip_block_key(key: str) -> str:
    rest = key[len("transformer.resblocks."):]
    index, name = rest.split(".", 1)
    for old, new in _CLIP_BLOCK:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    return f"blocks.{index}.{name}"


def clip_vision_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
    """An official CLIP / open_clip / Llip ``visual.*`` state dict (prefix stripped) -> our ViT's keys
    (for :func:`clip_vit`), and the tower's own output projection ``proj`` (None if absent).

    A 1-D ``class_embedding`` (open_clip) becomes our ``cls_token``; Llip's 2-D ``[K, width]`` mixture
    tokens become ``register_tokens`` (with ``register_pos``: their rows of the position table stay
    theirs)."""
    out, proj = {}, state.get("proj")
    for k, v in state.items():
        if k == "proj":
            continue
        if k == "conv1.weight":
            out["patch_embed.proj.weight"] = v
        elif k == "class_embedding":
            out["cls_token" if v.dim() == 1 else "register_tokens"] = v.reshape(1, -1, v.shape[-1])
        elif k == "positional_embedding":
            out["pos_embed"] = v.unsqueeze(0)
        elif k.startswith("ln_pre."):
            out["norm_pre." + k[len("ln_pre."):]] = v
        elif k.startswith("ln_post."):
            out["norm." + k[len("ln_post."):]] = v
        elif k.startswith("transformer.resblocks."):
            out[_clip_block_key(k)] = v
        else:
            raise KeyError(f"unexpected key in a CLIP vision state dict: {k!r}")
    return out, proj


def clip_text_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official CLIP / open_clip text-tower keys (``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks.*``, ``ln_final``, ``text_projection``) -> :class:`TextTransformer`'s."""
    return {(_clip_block_key(k) if k.startswith("transformer.resblocks.") else k): v for k, v in state.items()}


def open_clip_towers(state: dict[str, Tensor], vision_head_width: int = 64, text_head_width: int = 64,
                     act_layer: str = "gelu") -> tuple[VisionTransformer, Tensor, TextTransformer]:
    """Our towers from an open_clip / OpenAI CLIP state dict (``model.state_dict()`` or a pretrained
    checkpoint): ``(vision tower, its projection [width, embed_dim], text tower)``, weights loaded
    strictly. Sizes are read off the tensors; head counts follow open_clip's ``width // head_width``
    (64 for the released ViTs). ``act_layer="quick_gelu"`` for the OpenAI / ``-quickgelu`` models.
    The image embedding is ``vision(x)[:, 0] @ proj``, the text embedding ``text(tokens)``."""
    state = strip_prefixes(state)
    vstate, proj = clip_vision_state({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    w = vstate["patch_embed.proj.weight"]
    width, patch = w.shape[0], w.shape[-1]
    n_patches = vstate["pos_embed"].shape[1] - 1
    vision = clip_vit(official_init=False, img_size=int(round(n_patches ** 0.5)) * patch, patch_size=patch,
                      in_chans=w.shape[1], embed_dim=width, depth=_depth(vstate, "blocks."),
                      num_heads=width // vision_head_width,
                      mlp_ratio=vstate["blocks.0.mlp.fc1.weight"].shape[0] / width, class_token=True,
                      act_layer=act_layer).to(w.dtype)
    vision.load_state_dict(vstate, strict=True)
    tstate = clip_text_state({k: v for k, v in state.items() if k.startswith(_TEXT_KEYS)})
    emb, pos = tstate["token_embedding.weight"], tstate["positional_embedding"]
    text = TextTransformer(vocab_size=emb.shape[0], context_length=pos.shape[0], width=emb.shape[1],
                           depth=_depth(tstate, "blocks."), num_heads=emb.shape[1] // text_head_width,
                           mlp_ratio=tstate["blocks.0.mlp.fc1.weight"].shape[0] / emb.shape[1],
                           embed_dim=tstate["text_projection"].shape[1], act_layer=act_layer).to(emb.dtype)
    text.load_state_dict(tstate, strict=True)
    return vision, proj, text


_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_LLIP_MIXER = {"k_proj": "k_proj", "v_proj": "v_proj", "q_proj": "q_proj", "pred.out_proj": "out_proj"}


def llip_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An official Llip (``CMP``) state dict -> the keys of :class:`visrep.methods.llip.Llip`:
    ``visual.*`` (our ViT), ``text.*`` (:class:`TextTransformer`), ``mixer.*`` (``k_proj``, ``v_proj``,
    ``q_proj``, ``out_proj``, ``K_norm`` / ``Q_norm`` / ``V_norm``), ``logit_scale``, ``logit_bias``."""
    state = strip_prefixes(state)
    if "out_proj" in state and "pred.out_proj" not in state:  # the eval loader's rename
        state = {("pred.out_proj" if k == "out_proj" else k): v for k, v in state.items()}
    visual, _ = clip_vision_state({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    out = {f"visual.{k}": v for k, v in visual.items()}
    out.update({f"text.{k}": v for k, v in clip_text_state(
        {k: v for k, v in state.items() if k.startswith(_TEXT_KEYS)}).items()})
    for k, v in state.items():
        if k in _LLIP_MIXER:
            out[f"mixer.{_LLIP_MIXER[k]}"] = v
        elif k.split(".")[0] in ("K_norm", "Q_norm", "V_norm"):
            out[f"mixer.{k}"] = v
        elif k in ("logit_scale", "logit_bias"):
            out[k] = v
    return out


def _dinov2_backbone(state: dict[str, Tensor], which: str) -> dict[str, Tensor]:
    """The backbone of a DINOv2 training state: the FSDP checkpointer's ``{student,teacher}.{backbone,
    dino_head,ibot_head}.*`` keys -> the teacher's (``which="target_encoder"``, the default: the EMA
    network DINOv2 evaluates) or the student's (``which="encoder"``) ``backbone.*``; a
    ``teacher_checkpoint.pth`` (``backbone.*`` beside its heads) -> ``backbone.*``. Other states pass."""
    role = "student" if which == "encoder" else "teacher"
    if any(k.startswith(f"{role}.backbone.") for k in state):
        state = {k[len(role) + 1:]: v for k, v in state.items() if k.startswith(f"{role}.")}
    if any(k.startswith(("dino_head.", "ibot_head.")) for k in state):
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def load_official(path: str | os.PathLike, which: str = "target_encoder", num_heads: int | None = None,
                  map_location: str = "cpu") -> nn.Module:
    """Load an official I-JEPA (``which`` = encoder / target_encoder / predictor) or DINOv2 checkpoint
    (released backbones, training checkpoints: the teacher, or the student with ``which="encoder"``,
    and ``teacher_checkpoint.pth``).

    Accepts ``.pth``/``.pt`` (torch pickles) and ``.safetensors``. Returns our module with the
    weights loaded strictly.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    overrides: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        ckpt: Any = load_file(str(path))
        with safe_open(str(path), "pt") as f:  # our exports record the architecture
            meta = f.metadata() or {}
        arch = json.loads(meta.get("arch") or meta.get("model") or "{}")
        if num_heads is None:
            num_heads = arch.get("num_heads")
        if "pos_embed" in arch:
            overrides["pos_embed"] = arch["pos_embed"]
    else:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(ckpt, dict) and which in ckpt and isinstance(ckpt[which], dict):
        ckpt = ckpt[which]
    elif isinstance(ckpt, dict) and "model" in ckpt and isinstance(ckpt["model"], dict):
        ckpt = ckpt["model"]
    elif isinstance(ckpt, dict) and "teacher" in ckpt and isinstance(ckpt["teacher"], dict):
        ckpt = ckpt["teacher"]                      # DINOv2's eval/teacher_checkpoint.pth
    state = strip_prefixes(_dinov2_backbone(ckpt, which))
    if which == "predictor" or "predictor_embed.weight" in state:
        emb = state["predictor_embed.weight"]
        heads = num_heads or HEADS_BY_DIM.get(emb.shape[1])
        model = Predictor(num_patches=state["predictor_pos_embed"].shape[1], embed_dim=emb.shape[1],
                          predictor_embed_dim=emb.shape[0], depth=_depth(state, "predictor_blocks."),
                          num_heads=heads).to(emb.dtype)
        model.load_state_dict(state)
        return model
    return vit_from_state_dict(state, num_heads=num_heads, **overrides)


def dit_from_state_dict(state: dict[str, Tensor], num_heads: int | None = None) -> DiT:
    """Our :class:`DiT` from an official DiT ``models.py`` state dict (the same keys; without label
    dropout the official table has no null-class row: ours gets a zero row, unused then)."""
    w = state["x_embedder.proj.weight"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    table = state["y_embedder.embedding_table.weight"]
    out_c = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    model = DiT(img_size=int(round(state["pos_embed"].shape[1] ** 0.5)) * patch, patch_size=patch, in_chans=in_chans,
                embed_dim=dim, depth=_depth(state, "blocks."), num_heads=num_heads or HEADS_BY_DIM.get(dim, dim // 64),
                mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim, num_classes=table.shape[0] - 1,
                learn_sigma=out_c == 2 * in_chans, frequency_dim=state["t_embedder.mlp.0.weight"].shape[1]).to(w.dtype)
    model.load_state_dict(state, strict=True)
    return model


def load_format(path: str | os.PathLike, which: str = "target_encoder", num_heads: int | None = None) -> Any:
    """Load weights written in any layout :mod:`visrep.formats` writes into our modules: a timm folder
    (``config.json``) -> our ViT; an open_clip folder (``open_clip_config.json``) -> ``(vision tower,
    projection, text tower)`` (:func:`open_clip_towers`); a ``visrep export`` file -> :func:`load_exported`;
    any official checkpoint (I-JEPA, StoP, MSN with or without head, DINOv2, MAE -> its encoder, DiT,
    Llip CMP -> its vision tower) -> :func:`load_official`."""
    from safetensors.torch import load_file

    from .formats import _swiglu, dinov2_from_ours, ours_from_mae, ours_from_timm

    path = Path(path)
    if path.is_dir() and (path / "config.json").is_file():            # timm
        cfg = json.loads((path / "config.json").read_text())
        args = cfg.get("model_args", {})
        state, over = ours_from_timm(load_file(str(path / "model.safetensors")), args)
        if _swiglu(state):  # timm's packed SwiGLU (DINOv2 giant): fc1 = w12
            state = dinov2_from_ours(state)
        over.pop("pos_embed", None)
        return vit_from_state_dict(state, num_heads=num_heads or args.get("num_heads"), img_size=args.get("img_size"),
                                   **over)
    if path.is_dir() and (path / "open_clip_config.json").is_file():  # open_clip
        cfg = json.loads((path / "open_clip_config.json").read_text())["model_cfg"]
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        weights = next(p for p in (path / "open_clip_model.safetensors", path / "open_clip_pytorch_model.bin")
                       if p.is_file())
        state = load_file(str(weights)) if weights.suffix == ".safetensors" else torch.load(weights, weights_only=True)
        return open_clip_towers(state, vision_head_width=v.get("head_width", 64),
                                text_head_width=t["width"] // t.get("heads", 8),
                                act_layer="quick_gelu" if cfg.get("quick_gelu") else "gelu")
    if path.is_dir():
        raise FileNotFoundError(f"{path} holds neither a timm config.json nor an open_clip_config.json")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("class") in REBUILDABLE:
                return load_exported(path)
        ckpt: Any = load_file(str(path))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    flat = strip_prefixes(_dinov2_backbone(_unflatten_entry(ckpt, which), which))
    if "x_embedder.proj.weight" in flat:
        return dit_from_state_dict(flat, num_heads)
    if "visual.conv1.weight" in flat:                                    # Llip CMP / CLIP: the vision tower
        vstate, _ = clip_vision_state({k[len("visual."):]: v for k, v in flat.items() if k.startswith("visual.")})
        w = vstate["patch_embed.proj.weight"]
        k_tok = vstate["register_tokens"].shape[1] if "register_tokens" in vstate else 0
        n = vstate["pos_embed"].shape[1] - (k_tok or 1)
        vit = clip_vit(official_init=False, img_size=int(round(n ** 0.5)) * w.shape[-1], patch_size=w.shape[-1],
                       in_chans=w.shape[1], embed_dim=w.shape[0], depth=_depth(vstate, "blocks."),
                       num_heads=num_heads or w.shape[0] // 64,
                       mlp_ratio=vstate["blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
                       class_token="cls_token" in vstate, num_registers=k_tok).to(w.dtype)
        vit.load_state_dict(vstate, strict=True)
        return vit
    if "decoder_embed.weight" in flat:                                  # MAE: the encoder
        flat, _ = ours_from_mae(flat)
    flat = {k: v for k, v in flat.items() if not k.startswith("fc.") and k != "prototypes"}  # MSN's head
    return load_official_state(flat, which=which, num_heads=num_heads)


def _unflatten_entry(ckpt: dict, which: str) -> dict:
    """The entry ``which`` of a checkpoint (nested, or flattened with ``.`` in safetensors)."""
    if which in ckpt and isinstance(ckpt[which], dict):
        return ckpt[which]
    for entry in (which, "model", "teacher"):
        sub = {k[len(entry) + 1:]: v for k, v in ckpt.items() if k.startswith(entry + ".")}
        if sub:
            return sub
        if entry in ckpt and isinstance(ckpt[entry], dict):
            return ckpt[entry]
    return ckpt


def load_official_state(state: dict[str, Tensor], which: str = "target_encoder",
                        num_heads: int | None = None) -> nn.Module:
    """:func:`load_official` on a state dict already in memory (prefixes, DINOv2 heads handled)."""
    state = strip_prefixes(_dinov2_backbone(state, which))
    if which == "predictor" or "predictor_embed.weight" in state:
        emb = state["predictor_embed.weight"]
        model = Predictor(num_patches=state["predictor_pos_embed"].shape[1], embed_dim=emb.shape[1],
                          predictor_embed_dim=emb.shape[0], depth=_depth(state, "predictor_blocks."),
                          num_heads=num_heads or HEADS_BY_DIM.get(emb.shape[1])).to(emb.dtype)
        model.load_state_dict(state)
        return model
    return vit_from_state_dict(state, num_heads=num_heads)


def export_safetensors(module: nn.Module | dict[str, Tensor], path: str | os.PathLike,
                       metadata: dict[str, Any] | None = None) -> Path:
    """Write a module's state dict (official key names) as safetensors, atomically."""
    from safetensors.torch import save_file

    state = module.state_dict() if isinstance(module, nn.Module) else module
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)
    return path


def load_exported(path: str | os.PathLike) -> nn.Module:
    """Rebuild a module written by ``visrep export`` (:func:`export_safetensors` with the metadata of
    ``Method.export_modules``) and load its weights strictly."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported weights not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    cls_name, arch = meta.get("class"), json.loads(meta.get("arch") or "null")
    if cls_name not in REBUILDABLE or not isinstance(arch, dict):
        raise ValueError(f"{path} does not record a rebuildable architecture (metadata 'class'={cls_name!r}); "
                         f"known classes: {', '.join(REBUILDABLE)}; for official checkpoints use load_official")
    state = load_file(str(path))
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)  # BN counters: int64
    module = REBUILDABLE[cls_name](**arch).to(dtype)
    module.load_state_dict(state, strict=True)
    return module
