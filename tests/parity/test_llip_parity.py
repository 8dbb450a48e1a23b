"""Llip towers, mixer, loss and zero-shot scoring match the official facebookresearch/Llip code
(every ``llip_*`` fixture: kinds llip_visual, llip_xattn, llip_loss, llip_zeroshot), gradients included.

Everything is built on our code: the vision tower is our ViT with the mixture tokens as registers
(``visrep.hub.clip_vit``), the text tower ``visrep.models.text.TextTransformer``, the mixer and the
losses the pure functions of ``visrep.losses.contrastive``; official weights come in through
``visrep.hub.clip_vision_state`` / ``llip_state``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.eval.zeroshot import aggregate_prompts, class_prompts
from visrep.hub import clip_vision_state, clip_vit, llip_state
from visrep.losses.contrastive import llip_logits, llip_loss, llip_mix, per_token_projection, siglip_loss
from visrep.methods.llip import MixtureCrossAttention
from visrep.models.text import TextTransformer, Tokenizer

ACT = {"QuickGELU": "quick_gelu", "GELU": "gelu"}


# -- builders ---------------------------------------------------------------------------------------
def visual_from_official(vision_cfg: dict, heads: int, state: dict, act: str = "quick_gelu") -> nn.Module:
    vit_state, proj = clip_vision_state(state)
    grid = vision_cfg["image_size"] // vision_cfg["patch_size"]
    ncls = vision_cfg.get("ncls", 1)
    vit = clip_vit(img_size=vision_cfg["image_size"], patch_size=vision_cfg["patch_size"], in_chans=3,
                   embed_dim=vision_cfg["width"], depth=vision_cfg["layers"], num_heads=heads,
                   mlp_ratio=vision_cfg.get("mlp_ratio", 4.0), num_registers=ncls, act_layer=act).double()
    assert vit.pos_embed.shape[1] == ncls + grid * grid
    vit.load_state_dict(vit_state, strict=True)
    return vit


class CMP(nn.Module):
    """The official CMP model's pieces, built from our modules and its model config."""

    def __init__(self, model_cfg: dict, state: dict):
        super().__init__()
        vc, tc = model_cfg["vision_cfg"], model_cfg["text_cfg"]
        act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
        self.ncls, self.all_tokens = vc.get("ncls", 1), vc.get("pass_all_tokens", False)
        self.visual = clip_vit(img_size=vc["image_size"], patch_size=vc["patch_size"], in_chans=3,
                               embed_dim=vc["width"], depth=vc["layers"],
                               num_heads=vc["width"] // vc.get("head_width", 64),
                               mlp_ratio=vc.get("mlp_ratio", 4.0), num_registers=self.ncls, act_layer=act)
        self.text = TextTransformer(vocab_size=tc["vocab_size"], context_length=tc["context_length"], width=tc["width"],
                                    depth=tc["layers"], num_heads=tc["heads"], mlp_ratio=tc.get("mlp_ratio", 4.0),
                                    embed_dim=model_cfg["embed_dim"], act_layer=act)
        n = self.visual.pos_embed.shape[1] if self.all_tokens else self.ncls
        self.mixer = MixtureCrossAttention(n, vc["width"], tc["width"], model_cfg["embed_dim"],
                                           model_cfg.get("num_heads", 8), model_cfg.get("use_norm", False))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        self.logit_bias = nn.Parameter(torch.zeros(()))
        self.double()
        self.load_state_dict(llip_state(state), strict=True)

    def tokens(self, image):
        t = self.visual(image)
        return t if self.all_tokens else t[:, :self.ncls]


def official_name(state: dict, key: str) -> str:
    """Our parameter name of an official CMP key."""
    (ours,) = llip_state({key: state[key]}).keys()
    return ours


def check_grads(fx, prefix: str, module: nn.Module, state: dict, exclude: str | None = None) -> int:
    """Every ``out.grad.<prefix>.<official>`` equals our parameter's gradient; parameters without a
    stored gradient (and not excluded) get none."""
    ours = dict(module.named_parameters())
    stored = {k[len(f"out.grad.{prefix}."):]: k for k in fx.tensors if k.startswith(f"out.grad.{prefix}.")}
    covered = set()
    for off, key in stored.items():
        name = official_name(state, off)
        p = ours[name]
        assert p.grad is not None, f"{fx.name}: {name} ({off}) has no gradient"
        fx.assert_close(key, p.grad.reshape(fx.tensors[key].shape))
        covered.add(name)
    for off in state:
        name = official_name(state, off)
        if name in covered or (exclude and re.search(exclude, off)):
            continue
        g = ours[name].grad
        assert g is None or not g.any(), f"{fx.name}: unexpected gradient for {name} ({off})"
    return len(covered)


# -- vision tower -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", fixtures_of_kind("llip_visual"))
def test_llip_visual(path):
    """The tower's tokens (CMP's ``proj = None`` path), attention maps and gradients; the tower's own output
    projection too where the official forward could apply it. With ``pass_all_tokens`` and K > 1 the official
    3-D ``proj`` cannot be applied (its forward raises), so such fixtures hold no ``out.tokens_proj`` /
    ``in.probe_proj`` / ``out.grad.proj``: only those keys are skipped, everything else is compared."""
    fx = load_fixture(path)
    ctor, state = fx.config["constructor"], fx.prefixed("state.")
    vit = visual_from_official(ctor, ctor["heads"], state, ACT[ctor.get("act_layer", "GELU")])
    ncls, all_tokens = ctor["ncls"], ctor["pass_all_tokens"]
    with_proj = "out.tokens_proj" in fx.tensors
    if all_tokens and ncls > 1:
        assert not with_proj, f"{fx.name}: the official tower cannot apply its 3-D proj to all tokens"
    image = fx.tensors["in.image"].clone().requires_grad_(True)

    tokens = vit(image)
    if not all_tokens:
        tokens = tokens[:, :ncls]
    if ncls == 1 and not all_tokens:  # the official tower squeezes a single token
        tokens = tokens[:, 0]
    loss = (tokens * fx.tensors["in.probe_tokens"]).sum()
    if with_proj:
        proj = state["proj"].clone().requires_grad_(True)
        tokens_proj = per_token_projection(tokens, proj) if proj.dim() == 3 else tokens @ proj
        loss = (tokens_proj * fx.tensors["in.probe_proj"]).sum() + loss
    loss.backward()
    fx.assert_close("out.tokens", tokens.detach())
    if with_proj:
        fx.assert_close("out.tokens_proj", tokens_proj.detach())
        fx.assert_close("out.grad.proj", proj.grad)
    fx.assert_close("out.probe_loss", loss.detach())
    with torch.no_grad():
        maps = vit.attention_maps(fx.tensors["in.image"])
    attn = fx.listed("out.attn")
    assert len(attn) == len(maps) == ctor["layers"]
    for i, m in enumerate(maps):
        fx.assert_close(f"out.attn.{i}", m)
    fx.assert_close("out.grad.image", image.grad)
    ours = dict(vit.named_parameters())
    checked = 0
    for key in fx.tensors:
        if key.startswith("out.grad.") and key not in ("out.grad.image", "out.grad.proj"):
            off = key[len("out.grad."):]
            (name,) = clip_vision_state({off: state[off]})[0].keys()
            fx.assert_close(key, ours[name].grad.reshape(fx.tensors[key].shape))
            checked += 1
    assert checked == len(ours)


# -- cross-attention mixing --------------------------------------------------------------------------
@pytest.mark.parametrize("path", fixtures_of_kind("llip_xattn"))
def test_llip_cross_attention(path):
    fx = load_fixture(path)
    direct, ws = fx.config["direct"], fx.config["direct"]["weight_scale"]
    K, Q, V = (fx.tensors[f"in.direct.{n}"].clone().requires_grad_(True) for n in "KQV")
    out_proj = fx.tensors["state.pred.out_proj"].clone().requires_grad_(True)
    zv = llip_mix(K, Q, V, out_proj, ws)
    assert zv.shape == (direct["n_images"], direct["n_texts"], direct["embed_dim"])
    zvn = F.normalize(zv, dim=-1)
    loss = (zvn * fx.tensors["in.direct.probe"]).sum()
    loss.backward()
    fx.assert_close("out.direct.zv", zv.detach())
    fx.assert_close("out.direct.zv_normalized", zvn.detach())
    fx.assert_close("out.direct.probe_loss", loss.detach())
    for n, t in (("K", K), ("Q", Q), ("V", V), ("pred.out_proj", out_proj)):
        fx.assert_close(f"out.grad.direct.{n}", t.grad)

    mc = fx.config["model"]
    state = fx.prefixed("state.model.")
    model = CMP(mc["model_cfg"], state)
    ws = mc["weight_scale"]
    image, text = fx.tensors["in.model.image"], fx.tensors["in.model.text"]
    tokens = model.tokens(image)
    K, V = model.mixer.keys_values(tokens)
    h = model.text.encode(text)
    Q, zt = model.mixer.query(h), h @ model.text.text_projection
    zv = llip_mix(K, Q, V, model.mixer.out_proj, ws)
    zvn = F.normalize(zv, dim=-1)
    loss = (zvn * fx.tensors["in.model.probe"]).sum()
    loss.backward()
    for key, value in (("visual_tokens", tokens), ("K", K), ("V", V), ("Q", Q), ("zt", zt), ("text_eot_hidden", h),
                       ("zv", zv), ("zv_normalized", zvn), ("probe_loss", loss),
                       ("forward_logit_scale", model.logit_scale.exp()), ("forward_logit_bias", model.logit_bias)):
        fx.assert_close(f"out.model.{key}", value.detach())
    assert check_grads(fx, "model", model, state, exclude=mc.get("grad_exclude_regex")) > 0


# -- loss ---------------------------------------------------------------------------------------------
def _loss_inputs(fx, index=None):
    pick = (lambda t: t) if index is None else (lambda t: t[index])
    leaves = {n: pick(fx.tensors[f"in.{n}"]).clone().requires_grad_(True) for n in ("K", "Q", "V", "zt")}
    leaves["logit_scale_log"] = fx.tensors["in.logit_scale_log"].clone().requires_grad_(True)
    leaves["logit_bias"] = fx.tensors["in.logit_bias"].clone().requires_grad_(True)
    leaves["pred.out_proj"] = fx.tensors["state.pred.out_proj"].clone().requires_grad_(True)
    return leaves


def _llip_loss(x: dict, ws: float, group=None):
    scale = x["logit_scale_log"].exp()
    scale.retain_grad()
    v_text = F.normalize(x["zt"], dim=-1)
    v_text.retain_grad()
    loss = llip_loss(x["K"], x["Q"], x["V"], v_text, x["pred.out_proj"], ws, scale, x["logit_bias"], group=group)
    return loss, scale, v_text


def _ring_worker(rank: int, world: int, port: int, path: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fx = load_fixture(Path(path))
        x = _loss_inputs(fx, rank)
        loss, _, _ = _llip_loss(x, fx.config["direct"]["weight_temp"])
        loss.backward()
        torch.save({"loss": loss.detach(), **{n: t.grad for n, t in x.items()}}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("path", fixtures_of_kind("llip_loss"))
def test_llip_loss(path, tmp_path, free_port):
    fx = load_fixture(path)
    ws = fx.config["direct"]["weight_temp"]
    world = fx.config.get("world_size", 1)
    if world > 1:  # per-process losses and gradients of the official ring, here through all_gather
        mp.start_processes(_ring_worker, args=(world, free_port, str(path), str(tmp_path)), nprocs=world, join=True,
                           start_method="fork")
        for r in range(world):
            got = torch.load(tmp_path / f"{r}.pt", weights_only=True)
            fx.assert_close("out.loss", got["loss"], fx.tensors["out.loss"][r])
            for n in ("K", "Q", "V", "zt", "logit_bias", "logit_scale_log", "pred.out_proj"):
                fx.assert_close(f"out.grad.{n}", got[n], fx.tensors[f"out.grad.{n}"][r])
        # one process on the concatenated (rank-major) global batch
        x = {n: (t.flatten(0, 1) if n in ("K", "Q", "V", "zt") else t).detach().requires_grad_(True)
             for n, t in _loss_inputs(fx).items()}
        loss, _, _ = _llip_loss(x, ws)
        loss.backward()
        fx.assert_close("out.single_process.loss", loss.detach())
        for n, t in x.items():
            want = fx.tensors[f"out.single_process.grad.{n}"]
            fx.assert_close(f"out.single_process.grad.{n}", t.grad.reshape(want.shape))
        return

    x = _loss_inputs(fx)
    loss, scale, v_text = _llip_loss(x, ws)
    loss.backward()
    logits = llip_logits(x["K"], x["Q"], x["V"], v_text, x["pred.out_proj"], ws, scale, x["logit_bias"])
    fx.assert_close("out.loss", loss.detach())
    fx.assert_close("out.logits", logits.detach())
    fx.assert_close("out.V_text", v_text.detach())
    fx.assert_close("out.logit_scale", scale.detach())
    n = x["K"].shape[0]
    assert torch.equal(fx.tensors["out.labels"], 2 * torch.eye(n, dtype=torch.float64) - 1)
    for name, t in x.items():
        fx.assert_close(f"out.grad.{name}", t.grad)
    fx.assert_close("out.grad.V_text", v_text.grad)
    fx.assert_close("out.grad.logit_scale", scale.grad)
    if "out.siglip.loss" in fx.tensors:  # one mixture token: Llip is SigLIP on normalize(V @ out_proj)
        with torch.no_grad():
            feats = F.normalize(llip_mix(x["K"], x["Q"], x["V"], x["pred.out_proj"], ws)[:, 0], dim=-1)
            fx.assert_close("out.siglip.image_features", feats)
            fx.assert_close("out.siglip.loss", siglip_loss(feats, v_text, scale, x["logit_bias"]))
    if "in.train_step.image" in fx.tensors:
        _train_step(fx)


def _train_step(fx):
    tc = fx.config["train_step"]
    state = fx.prefixed("state.model.")
    model = CMP(tc["model_cfg"], state)
    K, V = model.mixer.keys_values(model.tokens(fx.tensors["in.train_step.image"]))
    h = model.text.encode(fx.tensors["in.train_step.text"])
    Q, zt = model.mixer.query(h), F.normalize(h @ model.text.text_projection, dim=-1)
    scale = model.logit_scale.exp()
    loss = llip_loss(K, Q, V, zt, model.mixer.out_proj, tc["weight_scale"], scale, model.logit_bias)
    logits = llip_logits(K, Q, V, zt, model.mixer.out_proj, tc["weight_scale"], scale, model.logit_bias)
    loss.backward()
    for key, value in (("K", K), ("V", V), ("Q", Q), ("logit_scale", scale), ("logits", logits), ("loss", loss),
                       ("zt_normalized", zt)):
        fx.assert_close(f"out.train_step.{key}", value.detach())
    assert check_grads(fx, "train_step", model, state) == len(list(model.parameters()))


# -- zero-shot ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", fixtures_of_kind("llip_zeroshot"))
def test_llip_zeroshot(path):
    fx = load_fixture(path)
    cfg = fx.config
    state = fx.prefixed("state.model.")
    model = CMP(cfg["model"]["model_cfg"], state).eval()
    tokenizer = Tokenizer(cfg["context_length"])
    with torch.no_grad():
        for case in cfg["cases"]:
            name = case["name"]
            classes = []
            for c, label in enumerate(case["labels"]):
                prompts = class_prompts(case["templates"], label)
                assert prompts == cfg["prompt_texts"][f"{name}.{c}"]
                assert torch.equal(tokenizer(prompts), fx.tensors[f"in.{name}.text_tokens_clip.{c}"])
                h = model.text.encode(fx.tensors[f"in.{name}.text_tokens.{c}"])
                Q, zt = model.mixer.query(h), h @ model.text.text_projection
                fx.assert_close(f"out.{name}.prompt_Q.{c}", Q)
                fx.assert_close(f"out.{name}.prompt_zt.{c}", zt)
                classes.append(aggregate_prompts({"q": Q, "zt": F.normalize(zt, dim=-1)}))
            Qc, tf = torch.stack([c["q"] for c in classes]), torch.stack([c["zt"] for c in classes])
            fx.assert_close(f"out.{name}.Q_class", Qc)
            fx.assert_close(f"out.{name}.text_features", tf)
            images = torch.cat(fx.listed(f"in.{name}.images"))
            targets = torch.cat(fx.listed(f"in.{name}.targets"))
            K, V = model.mixer.keys_values(model.tokens(images))
            fx.assert_close(f"out.{name}.image_K", K)
            fx.assert_close(f"out.{name}.image_V", V)
            for t in cfg["temperatures"]:
                scores = llip_logits(K, Qc, V, tf, model.mixer.out_proj, t)
                fx.assert_close(f"out.{name}.scores.t{t}", scores)
                acc = 100.0 * (scores.argmax(dim=1) == targets).double().mean()
                fx.assert_close(f"out.{name}.accuracy.t{t}", acc)
