"""Official checkpoint layouts load into our modules (and reproduce the official outputs)."""
import torch
from safetensors.torch import load_file

from visrep.hub import export_safetensors, load_official

FIX = "tests/fixtures/parity"


def _prefixed(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_ijepa_checkpoint_layout(tmp_path):
    t = load_file(f"{FIX}/ijepa_train_loss.safetensors")
    ckpt = {name: {"module." + k: v for k, v in _prefixed(t, f"state.{name}.").items()}
            for name in ("encoder", "target_encoder", "predictor")}
    ckpt["epoch"] = 3
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save(ckpt, path)
    target = load_official(path, which="target_encoder", num_heads=4)
    assert target.patch_size == 4 and target.embed_dim == 48 and target.cls_token is None
    enc_fx = load_file(f"{FIX}/ijepa_encoder.safetensors")
    encoder = load_official(path, which="encoder", num_heads=4)
    for k, v in _prefixed(t, "state.encoder.").items():
        torch.testing.assert_close(encoder.state_dict()[k], v, rtol=0, atol=0)
    predictor = load_official(path, which="predictor", num_heads=4)
    assert len(predictor.predictor_blocks) == 2
    assert enc_fx["in.imgs"].shape[-1] == 32


def test_dinov2_backbone_layout_and_export_roundtrip(tmp_path):
    t = load_file(f"{FIX}/dinov2_vit_reg4.safetensors")
    state = {"teacher.backbone." + k: v for k, v in _prefixed(t, "state.").items()}
    path = tmp_path / "dinov2_teacher_checkpoint.pth"
    torch.save({"model": state}, path)
    model = load_official(path, num_heads=4).eval()
    assert model.num_prefix == 5  # cls + 4 registers
    with torch.no_grad():
        out = model.forward_features(t["in.x"])["x_norm_clstoken"]
    torch.testing.assert_close(out, t["out.nomask.x_norm_clstoken"], atol=1e-9, rtol=1e-9)

    st = export_safetensors(model, tmp_path / "dinov2.safetensors", metadata={"model": {"num_heads": 4}})
    again = load_official(st).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.forward_features(t["in.x"])["x_norm_clstoken"], out, atol=0, rtol=0)


def test_wrong_input_shapes_are_named():
    import pytest

    from visrep.models import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\].*\(2, 3, 16, 16\)"):
        vit(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        vit(torch.zeros(2, 1, 18, 16))
    assert vit(torch.zeros(2, 1, 16, 16)).shape == (2, 16, 32)
