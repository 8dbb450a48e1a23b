"""IWM: the conditioned predictor reduces to I-JEPA when the conditioning is zeroed and the views are
equal; both conditionings have the right shapes and carry gradients."""
from __future__ import annotations

import pytest
import torch

from visrep.config import load_config
from visrep.data.views import NUM_PARAMS
from visrep.methods import DataInfo, Step, build_method
from visrep.models import Predictor

INFO = DataInfo(in_chans=3, image_size=16, num_classes=4, mean=(0.5,) * 3, std=(0.25,) * 3)
TINY = ["data.image_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "method.pred_emb_dim=16", "method.pred_depth=2", "method.num_pred_masks=2", "method.min_keep=2",
        "method.pred_mask_scale=0.1,0.2"]
STEP = Step(step=0, epoch=0, total_steps=10, steps_per_epoch=5)


def build(name: str, *overrides):
    torch.manual_seed(0)
    return build_method(load_config(None, [f"method.name={name}", *TINY, *overrides]), INFO).double()


@pytest.mark.parametrize("conditioning", ["feature", "none"])
def test_zeroed_conditioning_and_equal_views_give_the_ijepa_loss(conditioning):
    iwm = build("iwm", f"method.conditioning={conditioning}", "method.enc_mask_scale=0.85,1.0")
    ijepa = build("ijepa", "method.enc_mask_scale=0.85,1.0")
    missing, unexpected = ijepa.load_state_dict(iwm.state_dict(), strict=False)
    assert not missing and all(k.startswith("predictor.cond_") for k in unexpected)
    if conditioning == "feature":
        assert iwm.predictor.cond_gate.item() == 0.0  # conditioning off at init
    g = torch.Generator().manual_seed(3)
    images = torch.rand(6, 3, 16, 16, generator=g, dtype=torch.float64)
    masks_enc, masks_pred = ijepa.sample_masks(6, g)
    x = ijepa.normalize(images)
    action = torch.randn(6, NUM_PARAMS, generator=g, dtype=torch.float64)  # ignored when zeroed
    common = {"masks_enc": masks_enc, "masks_pred": masks_pred}
    want = ijepa.training_step({"image": x, **common}, STEP)["loss"]
    got = iwm.training_step({"image": x, "target_image": x.clone(), "action": action, **common}, STEP)["loss"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("conditioning", ["feature", "sequence"])
def test_conditionings_shapes_and_gradients(conditioning):
    torch.manual_seed(0)
    pred = Predictor((4, 4), embed_dim=16, predictor_embed_dim=8, depth=2, num_heads=2,
                     conditioning=conditioning, cond_dim=NUM_PARAMS).double()
    g = torch.Generator().manual_seed(1)
    masks_x = [torch.stack([torch.randperm(16, generator=g)[:6].sort().values for _ in range(3)])]
    masks = [torch.stack([torch.randperm(16, generator=g)[:4].sort().values for _ in range(3)]) for _ in range(2)]
    x = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    a = torch.randn(3, NUM_PARAMS, generator=g, dtype=torch.float64, requires_grad=True)
    out = pred(x, masks_x, masks, cond=a)
    assert out.shape == (2 * 3, 4, 16)
    out.square().sum().backward()
    if conditioning == "feature":
        assert pred.cond_gate.grad.abs().sum() > 0  # the gate opens from 0
        with torch.no_grad():
            pred.cond_gate.fill_(1.0)
        pred.zero_grad()
        pred(x, masks_x, masks, cond=a).square().sum().backward()
        assert pred.cond_mlp[0].weight.grad.abs().sum() > 0 and a.grad.abs().sum() > 0
    else:
        assert pred.cond_weight.grad.abs().sum() > 0 and pred.cond_bias.grad.abs().sum() > 0
        assert a.grad.abs().sum() > 0
    other = pred(x, masks_x, masks, cond=a.detach() + 1.0)
    assert not torch.allclose(other, pred(x, masks_x, masks, cond=a.detach()))  # the action matters
    with pytest.raises(ValueError, match="needs cond of shape"):
        pred(x, masks_x, masks)


def test_iwm_views_in_prepare_batch():
    iwm = build("iwm")
    batch = {"image": torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8), "label": torch.zeros(4),
             "index": torch.arange(4)}
    out = iwm.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert out["image"].shape == out["target_image"].shape == (4, 3, 16, 16)
    assert out["action"].shape == (4, NUM_PARAMS)
    again = iwm.prepare_batch(batch, torch.Generator().manual_seed(0))
    for k in ("image", "target_image", "action"):
        assert torch.equal(out[k], again[k]), k
