"""``visrep export --format`` writes weights that load strict into the real timm / open_clip classes with
our outputs (float64, 1e-5), and :func:`visrep.hub.load_format` reads every format back into our modules.

Each method is trained two steps from its tiny recipe (the contract test's), exported through
``runner.export_checkpoint`` (the CLI's path) and loaded into ``timm.create_model(name, pretrained=False,
**model_args)`` + ``load_state_dict(strict=True)``, into ``timm.create_model("local-dir:OUT")`` (the README's
two-liner) and into ``open_clip``'s ``CLIP``.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from test_contract import tiny_config

from visrep.formats import FORMATS, available, dinov2_from_ours, ours_from_dinov2, ours_from_timm, timm_from_ours
from visrep.hub import load_format
from visrep.runner import export_checkpoint

TIMM = {"ijepa": "target_encoder", "stop": "target_encoder", "iwm": "target_encoder", "msn": "target_encoder",
        "pmsn": "target_encoder", "dinov2": "teacher_backbone", "supervised": "encoder", "mae": "encoder",
        "paws": "encoder"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """name -> (checkpoint path, method) after two steps, trained once per name on demand."""
    from visrep.engine import train
    from visrep.methods import build_method
    from visrep.runner import data_info, load_split

    cache = {}

    def get(name: str, *overrides: str):
        key = (name, overrides)
        if key not in cache:
            cfg = tiny_config(name, tmp_path_factory.mktemp(name), "train.max_steps=2", *overrides)
            ds = load_split(cfg, "train")
            torch.manual_seed(cfg.train.seed)
            method = build_method(cfg, data_info(cfg, ds))
            cache[key] = (train(cfg, method, ds).checkpoint, method)
        return cache[key]

    return get


def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """float64, every parameter moved off its init (LayerScale, zeros) so that each weight matters."""
    module = module.double().eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.mark.parametrize("name", sorted(TIMM))
def test_timm_export_loads_strict_into_timm_with_equal_outputs(name, trained, tmp_path):
    import timm

    ckpt, method = trained(name)
    which = TIMM[name]
    exp = method.export_modules()[which]
    assert "timm" in available(exp.metadata)
    out = export_checkpoint(ckpt, str(tmp_path / "timm"), which=which, fmt="timm")
    cfg = json.loads((out / "config.json").read_text())
    pc = cfg["pretrained_cfg"]
    assert pc["num_classes"] == 0 and pc["mean"] == list(method.data_info.mean)
    assert pc["std"] == list(method.data_info.std) and pc["input_size"][0] == method.data_info.in_chans

    # the file's weights in the registered architecture, strict
    from safetensors.torch import load_file
    model = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"])
    model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    # the README's two-liner reads the same folder
    again = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert again.num_classes == 0

    # outputs equal to ours, on perturbed weights (float64)
    ours = _perturbed(copy.deepcopy(exp.module))
    tstate, args = timm_from_ours(ours.state_dict(), exp.metadata["arch"])
    model = timm.create_model(cfg["architecture"], pretrained=False, **args).double().eval()
    model.load_state_dict(tstate, strict=True)
    size = method.data_info.image_size
    x = torch.randn(2, method.data_info.in_chans, size, size, dtype=torch.float64, generator=torch.Generator()
                    .manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ours(x), atol=1e-5, rtol=1e-5)
    # and back into ours
    back = load_format(out)
    want = exp.module.state_dict()
    with torch.no_grad():
        x32 = x.float()
        torch.testing.assert_close(back(x32), exp.module.eval()(x32), atol=1e-5, rtol=1e-5)
    assert back.embed_dim == want["patch_embed.proj.weight"].shape[0]


def test_dinov2_swiglu_and_registers_through_timm(tmp_path):
    """DINOv2 giant's packed SwiGLU (timm's vit_giant_patch14_dinov2) and registers (reg4), both ways."""
    import timm

    from visrep.formats import timm_name
    from visrep.models.presets import dinov2_vit

    vit = _perturbed(dinov2_vit(num_register_tokens=4, ffn_layer="swiglufused", img_size=28, patch_size=14,
                                embed_dim=48, depth=2, num_heads=3))
    state, args = timm_from_ours(vit.state_dict(), vit.arch)
    name = timm_name(vit.arch)
    assert name == "vit_giant_patch14_reg4_dinov2"
    model = timm.create_model(name, pretrained=False, **args).double().eval()
    model.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), vit(x), atol=1e-5, rtol=1e-5)
    back, over = ours_from_timm(model.state_dict(), args)
    official = dinov2_from_ours(vit.state_dict())
    assert ".mlp.w12." in "".join(official) and ours_from_dinov2(official).keys() == vit.state_dict().keys()
    from visrep.hub import vit_from_state_dict
    rebuilt = vit_from_state_dict(dinov2_from_ours(back), num_heads=3).double().eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), vit(x), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_open_clip_export_loads_strict_into_open_clip_with_equal_outputs(name, trained, tmp_path):
    import open_clip

    ckpt, method = trained(name)
    out = export_checkpoint(ckpt, str(tmp_path / "oc"), which="visual", fmt="open_clip")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")  # the README's two-liner
    from safetensors.torch import load_file
    state = load_file(str(out / "open_clip_model.safetensors"))
    model.load_state_dict(state, strict=True)
    assert ("logit_bias" in state) == (name == "siglip")

    m = copy.deepcopy(method).double().eval()
    model = model.double().eval()
    model.load_state_dict({k: v.double() for k, v in state.items()}, strict=True)
    size = method.data_info.image_size
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    tokens = torch.randint(1, 100, (3, m.text.context_length))
    tokens[:, -2] = 49407  # EOT: the row maximum
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), m.visual(x)[:, 0] @ m.image_projection, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), m.text(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.logit_scale, m.logit_scale.reshape(()))
    vision, proj, text = load_format(out)
    with torch.no_grad():
        xf = x.float()
        torch.testing.assert_close(vision(xf)[:, 0] @ proj, method.eval().visual(xf)[:, 0] @ method.image_projection,
                                   atol=1e-5, rtol=1e-5)


def test_a_format_a_method_lacks_names_those_it_has(trained, tmp_path):
    ckpt, _ = trained("ijepa")
    with pytest.raises(ValueError, match=r"no 'open_clip' format; it exports as: visrep, official, timm"):
        export_checkpoint(ckpt, str(tmp_path / "x"), fmt="open_clip")
    with pytest.raises(ValueError, match=r"no 'timm' format; it exports as: visrep, official$"):
        export_checkpoint(ckpt, str(tmp_path / "x"), which="predictor", fmt="timm")
    with pytest.raises(ValueError, match="unknown format"):
        export_checkpoint(ckpt, str(tmp_path / "x"), fmt="onnx")
    assert FORMATS == ("visrep", "official", "timm", "open_clip")


def test_cli_export_format(trained, tmp_path, capsys):
    from visrep.cli import main

    ckpt, _ = trained("dinov2")
    assert main(["export", ckpt, str(tmp_path / "t"), "--format", "timm"]) == 0
    assert (tmp_path / "t" / "config.json").is_file()
    assert main(["export", ckpt, str(tmp_path / "d.pth"), "--format", "official", "--heads"]) == 0
    ck = torch.load(tmp_path / "d.pth", weights_only=True)
    assert set(ck) == {"teacher"} and any(k.startswith("dino_head.") for k in ck["teacher"])
    assert "backbone.mask_token" in ck["teacher"]
    back = load_format(tmp_path / "d.pth", num_heads=2)
    assert back.cls_token is not None
