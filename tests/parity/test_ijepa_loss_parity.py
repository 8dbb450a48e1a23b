"""The end-to-end I-JEPA objective (loss, predictions, targets, every gradient) matches the official."""
import pytest
import torch

from parity_helpers import fixtures_of_kind, load_fixture
from test_vit_parity import build_ijepa_encoder
from visrep.methods.ijepa import ijepa_loss
from visrep.models import Predictor


@pytest.mark.parametrize("path", fixtures_of_kind("ijepa_train_loss"))
def test_ijepa_train_loss(path):
    fx = load_fixture(path)
    encoder = build_ijepa_encoder(fx.config["encoder_kwargs"])
    encoder.load_state_dict(fx.prefixed("state.encoder."), strict=True)
    target = build_ijepa_encoder(fx.config["encoder_kwargs"])
    target.load_state_dict(fx.prefixed("state.target_encoder."), strict=True)
    predictor = Predictor(**fx.config["predictor_kwargs"]).double()
    predictor.load_state_dict(fx.prefixed("state.predictor."), strict=True)

    kind = "l2" if fx.config.get("loss") == "l2" else "smooth_l1"
    loss, z, h = ijepa_loss(encoder, target, predictor, fx.tensors["in.imgs"],
                            fx.listed("in.masks_enc"), fx.listed("in.masks_pred"), kind)
    loss.backward()
    fx.assert_close("out.loss", loss.detach())
    fx.assert_close("out.z", z.detach())
    fx.assert_close("out.h", h)
    checked = 0
    for name, module in (("encoder", encoder), ("predictor", predictor)):
        for pname, p in module.named_parameters():
            key = f"out.grad.{name}.{pname}"
            if key in fx.tensors:
                assert p.grad is not None, f"{key}: no gradient"
                fx.assert_close(key, p.grad)
                checked += 1
            elif p.requires_grad:
                assert p.grad is None or torch.count_nonzero(p.grad) == 0, f"{key}: unexpected gradient"
        if f"out.grad_norm_{name}" in fx.tensors:
            norms = [p.grad.norm() for p in module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms))
            fx.assert_close(f"out.grad_norm_{name}", norm)
    assert checked == len([k for k in fx.tensors if k.startswith("out.grad.")])
    assert all(p.grad is None for p in target.parameters())
