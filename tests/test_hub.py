"""Official checkpoint layouts load into our modules and reproduce the official outputs.

The parity fixtures (``VISREP_PARITY_DIR``, default ``tests/fixtures/parity``; see
``tests/parity/parity_helpers.py``) hold state dicts of the official I-JEPA / DINOv2 modules, an input
and the official module's output on it. Here each state dict is written in the official *checkpoint*
layout (DDP ``module.`` prefixes, the ``encoder`` / ``target_encoder`` / ``predictor`` entries of an
I-JEPA training checkpoint, a plain or ``teacher.backbone.``-prefixed DINOv2 backbone), loaded with
``visrep.hub.load_official`` (architecture read off the tensors' shapes), run on the fixture input and
compared with the official output at the sidecar's tolerance; then exported to safetensors and loaded
again.
"""
import pytest
import torch

from parity.parity_helpers import fixtures_of_kind, load_fixture
from visrep.hub import export_safetensors, load_official
from visrep.models import VisionTransformer


def _ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as the official I-JEPA training saves it (modules wrapped in DistributedDataParallel)."""
    return {"module." + k: v for k, v in state.items()}


def _other(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Same keys and shapes, different values: a decoy for the checkpoint entry that must not be loaded."""
    return {k: v + 1 for k, v in state.items()}


def _ijepa_checkpoint(path, **entries) -> None:
    """An official I-JEPA training checkpoint (``src/train.py`` ``save_checkpoint``)."""
    torch.save({**entries, "opt": {}, "scaler": None, "epoch": 3, "loss": 0.5, "batch_size": 4,
                "world_size": 1, "lr": 1e-3}, path)


def _check_ijepa_encoder_outputs(fx, model) -> None:
    imgs = fx.tensors["in.imgs"]
    with torch.no_grad():
        fx.assert_close("out.full", model(imgs))
        fx.assert_close("out.ctx", model(imgs, idx_keep=fx.listed("in.masks_enc")))
        fx.assert_close("out.multi_pred_masks", model(imgs, idx_keep=fx.listed("in.masks_pred")))


@pytest.mark.parametrize("which", ["encoder", "target_encoder"])
@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_encoder"))
def test_official_ijepa_encoder_checkpoint_reproduces_outputs(path, which, tmp_path):
    fx = load_fixture(path)
    kw = fx.config["encoder_kwargs"]
    state = fx.prefixed("state.")
    decoy = "target_encoder" if which == "encoder" else "encoder"
    ckpt = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    _ijepa_checkpoint(ckpt, **{which: _ddp(state), decoy: _ddp(_other(state))})

    model = load_official(ckpt, which=which, num_heads=kw["num_heads"])
    img = kw["img_size"][0] if isinstance(kw["img_size"], list) else kw["img_size"]
    assert model.patch_size == kw["patch_size"] and model.embed_dim == kw["embed_dim"]
    assert len(model.blocks) == kw["depth"] and model.grid == (img // kw["patch_size"],) * 2
    assert model.cls_token is None and model.pos_embed.dtype == torch.float64
    _check_ijepa_encoder_outputs(fx, model)

    exported = export_safetensors(model, tmp_path / "encoder.safetensors",
                                  metadata={"model": {"num_heads": kw["num_heads"]}})
    again = load_official(exported)
    _check_ijepa_encoder_outputs(fx, again)


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_predictor"))
def test_official_ijepa_predictor_checkpoint_reproduces_outputs(path, tmp_path):
    fx = load_fixture(path)
    kw = fx.config["predictor_kwargs"]
    state = fx.prefixed("state.")
    ckpt = tmp_path / "jepa-latest.pth.tar"
    _ijepa_checkpoint(ckpt, predictor=_ddp(state))

    model = load_official(ckpt, which="predictor", num_heads=kw["num_heads"])
    assert len(model.predictor_blocks) == kw["depth"]
    assert model.predictor_embed.weight.shape == (kw["predictor_embed_dim"], kw["embed_dim"])
    with torch.no_grad():
        out = model(fx.tensors["in.x"], fx.listed("in.masks_x"), fx.listed("in.masks"))
    fx.assert_close("out.pred", out)


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_train_loss"))
def test_ijepa_training_checkpoint_entries(path, tmp_path):
    """Encoder, target encoder and predictor of one official training state load bit for bit."""
    fx = load_fixture(path)
    names = ("encoder", "target_encoder", "predictor")
    ckpt = tmp_path / "jepa-ep3.pth.tar"
    _ijepa_checkpoint(ckpt, **{name: _ddp(fx.prefixed(f"state.{name}.")) for name in names})
    heads = fx.config["encoder_kwargs"]["num_heads"]
    for name in names:
        module = load_official(ckpt, which=name, num_heads=heads)
        expected = fx.prefixed(f"state.{name}.")
        loaded = module.state_dict()
        assert set(loaded) == set(expected), name
        for k, v in expected.items():
            torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=f"{name}.{k}")
    assert len(module.predictor_blocks) == fx.config["predictor_kwargs"]["depth"]


def _dinov2_checkpoint(path, state, layout: str) -> None:
    if layout == "plain":  # the released backbones (dinov2_vit*14*_pretrain.pth)
        torch.save(state, path)
    elif layout == "teacher_backbone":  # a training checkpoint holding only the teacher backbone
        torch.save({"model": {"teacher.backbone." + k: v for k, v in state.items()}, "iteration": 9}, path)
    elif layout == "training":  # the FSDP checkpointer: student and teacher, backbones and heads
        head = {"dino_head.last_layer.weight_g": torch.ones(8, 1), "ibot_head.mlp.0.weight": torch.zeros(4, 4)}
        model = {f"teacher.backbone.{k}": v for k, v in state.items()}
        model.update({f"student.backbone.{k}": torch.zeros_like(v) for k, v in state.items()})
        for role in ("student", "teacher"):
            model.update({f"{role}.{k}": v for k, v in head.items()})
        torch.save({"model": model, "iteration": 9}, path)
    else:  # train.py's eval/<iter>/teacher_checkpoint.pth
        torch.save({"teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                                "dino_head.mlp.0.weight": torch.zeros(4, 4)}}, path)


def _check_dinov2_outputs(fx, model) -> None:
    x = fx.tensors["in.x"]
    checked = 0
    with torch.no_grad():
        for tag, mask in (("nomask", None), ("masked", fx.tensors["in.masks"])):
            out = model.forward_features(x, mask=mask)
            for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
                if f"out.{tag}.{key}" in fx.tensors:
                    fx.assert_close(f"out.{tag}.{key}", out[key])
                    checked += 1
        fx.assert_close("out.forward_eval", model.forward_features(x)["x_norm_clstoken"])
    assert checked >= 6, f"{fx.name}: only {checked} outputs compared"


@pytest.mark.parametrize("layout", ["plain", "teacher_backbone", "training", "teacher_checkpoint"])
@pytest.mark.parametrize("path", fixtures_of_kind("dinov2_vit"))
def test_official_dinov2_checkpoint_reproduces_outputs(path, layout, tmp_path):
    fx = load_fixture(path)
    cfg = fx.config["DinoVisionTransformer"]
    ckpt = tmp_path / "dinov2_checkpoint.pth"
    _dinov2_checkpoint(ckpt, fx.prefixed("state."), layout)

    model = load_official(ckpt, num_heads=cfg["num_heads"]).eval()
    assert model.num_prefix == 1 + cfg["num_register_tokens"]  # cls + registers
    assert model.patch_size == cfg["patch_size"] and len(model.blocks) == cfg["depth"]
    _check_dinov2_outputs(fx, model)
    if layout == "training":  # which="encoder": the student's backbone (zeros here), never a mix of both
        student = load_official(ckpt, which="encoder", num_heads=cfg["num_heads"])
        assert all(not v.any() for v in student.state_dict().values())

    exported = export_safetensors(model, tmp_path / "dinov2.safetensors",
                                  metadata={"model": {"num_heads": cfg["num_heads"]}})
    again = load_official(exported).eval()
    _check_dinov2_outputs(fx, again)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(fx.tensors["in.x"])["x_prenorm"],
                                   model.forward_features(fx.tensors["in.x"])["x_prenorm"], atol=0, rtol=0)


def test_wrong_input_shapes_are_named():
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\].*\(2, 3, 16, 16\)"):
        vit(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        vit(torch.zeros(2, 1, 18, 16))
    assert vit(torch.zeros(2, 1, 16, 16)).shape == (2, 16, 32)


def test_dinov2_swiglu_ffn_matches_the_reference_formula_and_loads_official_keys():
    """DINOv2's SwiGLUFFNFused: hidden (int(4d * 2/3) + 7) // 8 * 8, out = w3(silu(x1) * x2), [x1, x2] = w12(x)."""
    import torch.nn.functional as F

    from visrep.hub import dinov2_vit, vit_from_state_dict

    torch.manual_seed(0)
    vit = dinov2_vit(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2, ffn_layer="swiglufused").eval()
    mlp = vit.blocks[0].mlp
    hidden = (int(48 * 4 * 2 / 3) + 7) // 8 * 8
    assert mlp.fc1.weight.shape == (2 * hidden, 48) and mlp.fc2.weight.shape == (48, hidden)
    x = torch.randn(3, 5, 48)
    x1, x2 = F.linear(x, mlp.fc1.weight, mlp.fc1.bias).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(x1) * x2, mlp.fc2.weight, mlp.fc2.bias))
    official = {k.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3."): v
                for k, v in vit.state_dict().items()}
    rebuilt = vit_from_state_dict(official, num_heads=2).eval()
    assert rebuilt.arch["ffn"] == "swiglu" and rebuilt.arch["mlp_ratio"] == 4.0
    images = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(rebuilt(images), vit(images))
