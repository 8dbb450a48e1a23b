"""StoP predictor and training loss match the official amirbar/StoP code (every ``stop_*`` fixture)."""
import re

import pytest
import torch
import torch.nn.functional as F

from parity_helpers import fixtures_of_kind, load_fixture
from visrep.hub import vit_from_state_dict
from visrep.methods.ijepa import ijepa_loss
from visrep.models import Predictor


def _int(pattern: str, text: str) -> int:
    return int(re.search(pattern, text).group(1))


def build_predictor(init: dict, state: dict, stop: bool) -> Predictor:
    """Our predictor with the official ``deit_predictor`` shapes (heads from the recorded constructor)."""
    heads = _int(r"num_heads=(\d+)", init["resulting_predictor"])
    emb = state["predictor_embed.weight"]
    pred = Predictor(num_patches=state["predictor_pos_embed"].shape[1], embed_dim=emb.shape[1],
                     predictor_embed_dim=emb.shape[0], depth=init["pred_depth"], num_heads=heads,
                     stop_sigma=init["noise_var"] if stop else None).double()
    pred.load_state_dict(state, strict=True)
    return pred


@pytest.mark.parametrize("path", fixtures_of_kind("stop_predictor"))
def test_stop_predictor(path):
    fx = load_fixture(path)
    init, state = fx.config["init_model"], fx.prefixed("state.")
    x, masks_x, masks = fx.tensors["in.x"], fx.listed("in.masks_x"), fx.listed("in.masks")
    pred = build_predictor(init, state, stop=True)
    assert not pred.mask_token.requires_grad  # unused by StoP
    with torch.no_grad():
        noise = fx.listed("in.rng.stop_train.noise")
        for k, n in enumerate(noise):
            fx.assert_close(f"out.stop_train.noise_embedding.{k}", pred.predictor_embed(n))
        fx.assert_close("out.stop_train.pred", pred.train()(x, masks_x, masks, noise=noise))
        pred.stop_eval_noise = True  # the official eval mode keeps the noise
        fx.assert_close("out.stop_eval.pred", pred.eval()(x, masks_x, masks,
                                                          noise=fx.listed("in.rng.stop_eval.noise")))
        # StoP off in the official code: bare position embeddings = an I-JEPA predictor with a zero mask token
        nostop = build_predictor(init, state, stop=False)
        nostop.mask_token.zero_()
        fx.assert_close("out.nostop.pred", nostop.eval()(x, masks_x, masks))


@pytest.mark.parametrize("path", fixtures_of_kind("stop_train_loss"))
def test_stop_train_loss(path):
    fx = load_fixture(path)
    init = fx.config["init_model"]
    heads = _int(r"num_heads=(\d+)", init["deit_fxmicro"])
    encoder = vit_from_state_dict(fx.prefixed("state.encoder."), num_heads=heads)
    target = vit_from_state_dict(fx.prefixed("state.target_encoder."), num_heads=heads)
    target.requires_grad_(False)
    predictor = build_predictor(init, fx.prefixed("state.predictor."), stop=True).train()
    masks_enc = fx.listed("in.masks_enc")
    loss, z, h = ijepa_loss(encoder, target, predictor, fx.tensors["in.imgs"], masks_enc,
                            fx.listed("in.masks_pred"), "smooth_l1", target_blocks=fx.config["target_blocks"],
                            pairing="rows", noise=fx.listed("in.rng.noise"))
    loss.backward()
    fx.assert_close("out.loss", loss.detach())
    fx.assert_close("out.z", z.detach())
    fx.assert_close("out.h", h)
    fx.assert_close("out.pred_loss", F.smooth_l1_loss(z, h, reduction="none").mean(dim=(1, 2)).detach())
    checked = 0
    for name, module in (("encoder", encoder), ("predictor", predictor)):
        for pname, p in module.named_parameters():
            key = f"out.grad.{name}.{pname}"
            if key in fx.tensors:
                assert p.grad is not None, f"{key}: no gradient"
                fx.assert_close(key, p.grad)
                checked += 1
            else:
                assert p.grad is None, f"{key}: unexpected gradient"
    assert checked == len([k for k in fx.tensors if k.startswith("out.grad.")])
    if len(masks_enc) > 1:  # the official row order pairs some predictions with other samples' targets
        _, _, h_blocks = ijepa_loss(encoder, target, predictor, fx.tensors["in.imgs"], masks_enc,
                                    fx.listed("in.masks_pred"), target_blocks=fx.config["target_blocks"],
                                    pairing="blocks", noise=fx.listed("in.rng.noise"))
        assert not torch.equal(h_blocks, h)
