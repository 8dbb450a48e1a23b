"""Our ViT and predictor, loaded with official state dicts, reproduce the official outputs."""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.hub import dinov2_vit, ijepa_vit
from visrep.models import Predictor, sincos_pos_embed_2d


def _img_size(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def build_ijepa_encoder(kwargs: dict) -> torch.nn.Module:
    kw = {k: v for k, v in kwargs.items() if k != "norm_layer"}
    kw["img_size"] = _img_size(kw["img_size"])
    return ijepa_vit(**kw).double()


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_encoder"))
def test_ijepa_encoder(path):
    fx = load_fixture(path)
    model = build_ijepa_encoder(fx.config["encoder_kwargs"])
    model.load_state_dict(fx.prefixed("state."), strict=True)
    imgs = fx.tensors["in.imgs"]
    with torch.no_grad():
        fx.assert_close("out.full", model(imgs))
        fx.assert_close("out.ctx", model(imgs, idx_keep=fx.listed("in.masks_enc")))
        fx.assert_close("out.multi_pred_masks", model(imgs, idx_keep=fx.listed("in.masks_pred")))
    d = fx.tensors["out.sincos_pos_embed_f64"].shape[-1]
    g = model.grid
    fx.assert_close("out.sincos_pos_embed_f64", sincos_pos_embed_2d(d, *g))
    fx.assert_close("out.sincos_pos_embed_f64_cls", sincos_pos_embed_2d(d, *g, cls_token=True))


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_predictor"))
def test_ijepa_predictor(path):
    fx = load_fixture(path)
    model = Predictor(**fx.config["predictor_kwargs"]).double()
    model.load_state_dict(fx.prefixed("state."), strict=True)
    with torch.no_grad():
        out = model(fx.tensors["in.x"], fx.listed("in.masks_x"), fx.listed("in.masks"))
    fx.assert_close("out.pred", out)


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_vit"))
def test_dinov2_vit(path):
    fx = load_fixture(path)
    cfg = dict(fx.config["DinoVisionTransformer"])
    for k in ("drop_path_rate", "ffn_bias", "proj_bias", "drop_path_uniform", "block_fn", "ffn_layer", "block_chunks"):
        cfg.pop(k, None)
    model = dinov2_vit(**cfg).double().eval()
    model.load_state_dict(fx.prefixed("state."), strict=True)
    x, masks = fx.tensors["in.x"], fx.tensors["in.masks"]
    with torch.no_grad():
        for tag, m in (("nomask", None), ("masked", masks)):
            out = model.forward_features(x, mask=m)
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
                if f"out.{tag}.{key}" in fx.tensors:
                    fx.assert_close(f"out.{tag}.{key}", out[key])
        if "out.forward_eval" in fx.tensors:
            fx.assert_close("out.forward_eval", model.forward_features(x)["x_norm_clstoken"])
        n = len([k for k in fx.tensors if k.startswith("out.intermediate.") and k.endswith(".cls")])
        if n:
            inter = model.get_intermediate_layers(x, n=n, reshape=True, return_class_token=True, norm=True)
            for i, (patch, cls) in enumerate(inter):
                fx.assert_close(f"out.intermediate.{i}.patch", patch)
                fx.assert_close(f"out.intermediate.{i}.cls", cls)
        if "out.intermediate_block0_nonorm.patch" in fx.tensors:
            (patch,) = model.get_intermediate_layers(x, n=[0], reshape=False, norm=False)
            fx.assert_close("out.intermediate_block0_nonorm.patch", patch)
        for tag, key in (("interp", "in.x_interp"), ("rect", "in.x_rect")):
            if key not in fx.tensors:
                continue
            xi = fx.tensors[key]
            gh, gw = xi.shape[-2] // model.patch_size, xi.shape[-1] // model.patch_size
            pos = torch.cat([model.pos_embed[:, :1].float().to(xi.dtype), model.patch_pos_embed(gh, gw)], dim=1)
            fx.assert_close(f"out.{tag}.pos_embed", pos)
            out = model.forward_features(xi)
            fx.assert_close(f"out.{tag}.x_norm_clstoken", out["x_norm_clstoken"])
            fx.assert_close(f"out.{tag}.x_norm_patchtokens", out["x_norm_patchtokens"])
