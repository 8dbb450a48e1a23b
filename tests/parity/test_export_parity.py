"""Official layouts, both ways, on the state dicts of the official model classes stored in the parity
fixtures (key names, shapes, float64 values and the official outputs).

For each: the official state is written as the official checkpoint, read by ``visrep.hub.load_format``
into our module (outputs compared with the official ones where the fixture holds a deterministic forward),
then written back by ``visrep.formats.export_format`` / the pure maps in the official layout and compared
with the original strictly: the same keys, shapes, dtypes and values (``torch.equal``).
"""
from __future__ import annotations

import types

import pytest
import torch

from parity.parity_helpers import fixtures_of_kind, load_fixture
from visrep.formats import cmp_from_ours, declare, export_format, mae_from_ours, open_clip_from_ours, ours_from_mae
from visrep.hub import llip_state, load_format, open_clip_towers
from visrep.methods.base import module_metadata


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def _export(module, layout: str, path, **kw):
    meta = {**module_metadata(module), **declare(official=layout)}
    return export_format(module, meta, "official", path, **kw)


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_encoder"))
def test_ijepa_encoder_official_both_ways(path, tmp_path):
    fx = load_fixture(path)
    state = fx.prefixed("state.")
    torch.save(state, tmp_path / "enc.pth")
    model = load_format(tmp_path / "enc.pth", num_heads=fx.config["encoder_kwargs"]["num_heads"])
    with torch.no_grad():
        fx.assert_close("out.full", model(fx.tensors["in.imgs"]))
    out = _export(model, "vit", tmp_path / "back.pth")
    _assert_same(torch.load(out, weights_only=True), state)


@pytest.mark.parametrize("path", fixtures_of_kind("stop_train_loss"))
def test_stop_encoders_and_predictor_official_both_ways(path, tmp_path):
    fx = load_fixture(path)
    heads = 1  # no state of their own
    for which in ("encoder", "target_encoder", "predictor"):
        state = fx.prefixed(f"state.{which}.")
        torch.save({which: state}, tmp_path / "ckpt.pth")
        model = load_format(tmp_path / "ckpt.pth", which=which, num_heads=heads)
        _assert_same(torch.load(_export(model, "vit", tmp_path / f"{which}.pth"), weights_only=True), state)


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_vit"))
def test_dinov2_backbone_official_both_ways(path, tmp_path):
    fx = load_fixture(path)
    kw = fx.config["DinoVisionTransformer"]
    state = fx.prefixed("state.")
    torch.save(state, tmp_path / "backbone.pth")
    model = load_format(tmp_path / "backbone.pth", num_heads=kw["num_heads"]).eval()
    with torch.no_grad():
        feats = model.forward_features(fx.tensors["in.x"])
    fx.assert_close("out.nomask.x_norm_clstoken", feats["x_norm_clstoken"])
    fx.assert_close("out.nomask.x_norm_patchtokens", feats["x_norm_patchtokens"])
    _assert_same(torch.load(_export(model, "dinov2", tmp_path / "back.pth"), weights_only=True), state)


@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_step"))
def test_dinov2_teacher_checkpoint_with_heads(path, tmp_path):
    """``--heads``: the teacher backbone with dino_head (and ibot_head) as eval/teacher_checkpoint.pth."""
    fx = load_fixture(path)
    teacher = fx.prefixed("state.teacher.")
    heads = {h: {k[len(h) + 1:]: v for k, v in teacher.items() if k.startswith(h + ".")}  # a part: a state dict
             for h in ("dino_head", "ibot_head") if any(k.startswith(h + ".") for k in teacher)}
    torch.save({"teacher": teacher}, tmp_path / "teacher_checkpoint.pth")
    backbone = load_format(tmp_path / "teacher_checkpoint.pth", num_heads=1)  # heads: no state of their own
    meta = {**module_metadata(backbone), **declare(official={"layout": "dinov2", "parts": {h: h for h in heads}})}
    out = export_format(backbone, meta, "official", tmp_path / "back.pth", method=types.SimpleNamespace(**heads),
                        heads=True)
    _assert_same(torch.load(out, weights_only=True)["teacher"], teacher)


@pytest.mark.parametrize("path", fixtures_of_kind("msn_step"))
def test_msn_encoder_official_with_head_and_prototypes(path, tmp_path):
    fx = load_fixture(path)
    te, protos = fx.prefixed("state.target_encoder."), fx.tensors["state.prototypes"]
    torch.save({"target_encoder": te, "prototypes": protos}, tmp_path / "msn.pth")
    enc = load_format(tmp_path / "msn.pth", num_heads=fx.config["model"]["num_heads"])
    head = {k[3:]: v for k, v in te.items() if k.startswith("fc.")}
    method = types.SimpleNamespace(head=head, prototypes=protos)  # a part: a module or its state dict
    meta = {**module_metadata(enc), **declare(official={"layout": "msn", "entry": "target_encoder",
                                                        "parts": {"head": "head", "prototypes": "prototypes"}})}
    back = torch.load(export_format(enc, meta, "official", tmp_path / "b.pth", method=method, heads=True),
                      weights_only=True)
    _assert_same(back["target_encoder"], te)
    assert torch.equal(back["prototypes"], protos)
    plain = torch.load(export_format(enc, meta, "official", tmp_path / "p.pth", method=method), weights_only=True)
    _assert_same(plain, {k: v for k, v in te.items() if not k.startswith("fc.")})


@pytest.mark.parametrize("path", fixtures_of_kind("mae_step"))
def test_mae_official_both_ways(path, tmp_path):
    fx = load_fixture(path)
    state = fx.prefixed("state.")
    enc, dec = ours_from_mae(state)
    _assert_same(mae_from_ours(enc, dec), state)
    torch.save({"model": state}, tmp_path / "mae.pth")
    encoder = load_format(tmp_path / "mae.pth", num_heads=fx.config["num_heads"])
    _assert_same(encoder.state_dict(), enc)


@pytest.mark.parametrize("path", fixtures_of_kind("dit_step"))
def test_dit_official_both_ways(path, tmp_path):
    fx = load_fixture(path)
    state = fx.prefixed("state.model.")
    torch.save({"model": state, "ema": state}, tmp_path / "dit.pt")
    model = load_format(tmp_path / "dit.pt", which="model", num_heads=fx.config["model"]["num_heads"])
    _assert_same(torch.load(_export(model, "dit", tmp_path / "back.pt"), weights_only=True), state)


@pytest.mark.parametrize("path", fixtures_of_kind("llip_loss", "llip_xattn", "llip_zeroshot"))
def test_llip_cmp_official_both_ways(path, tmp_path):
    fx = load_fixture(path)
    state = fx.prefixed("state.model.")
    if not state:
        pytest.skip("no CMP model in this fixture")
    _assert_same(cmp_from_ours(llip_state(state)), state)


@pytest.mark.parametrize("path", fixtures_of_kind("llip_visual"))
def test_llip_vision_tower_from_cmp_layout(path, tmp_path):
    fx = load_fixture(path)
    c = fx.config["constructor"]
    state = {f"visual.{k}": v for k, v in fx.prefixed("state.").items() if k != "proj"}  # CMP drops proj
    torch.save(state, tmp_path / "cmp.pt")
    vit = load_format(tmp_path / "cmp.pt", num_heads=c["heads"]).eval()
    assert vit.arch["num_registers"] == c["ncls"]
    if not c["pass_all_tokens"]:
        with torch.no_grad():
            fx.assert_close("out.tokens", vit(fx.tensors["in.image"])[:, :c["ncls"]])
    _assert_same(cmp_from_ours({f"visual.{k}": v for k, v in vit.state_dict().items()}), state)


@pytest.mark.parametrize("path", fixtures_of_kind("clip_step", "siglip_step"))
def test_open_clip_state_both_ways(path):
    fx = load_fixture(path)
    state = fx.prefixed("state.")
    c = fx.config
    vision, proj, text = open_clip_towers(state, vision_head_width=c["vision_cfg"]["head_width"],
                                          text_head_width=c["text_cfg"]["width"] // c["text_cfg"]["heads"],
                                          act_layer="quick_gelu")
    back = open_clip_from_ours(vision.state_dict(), text.state_dict(), proj, state["logit_scale"],
                               state.get("logit_bias"))
    _assert_same(back, state)
