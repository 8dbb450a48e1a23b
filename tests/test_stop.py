"""StoP's predictor option: properties the paper and the official code imply (no fixture needed)."""
from __future__ import annotations

import torch

from visrep.models import Predictor


def predictors(sigma: float):
    torch.manual_seed(0)
    stop = Predictor((4, 4), embed_dim=16, predictor_embed_dim=8, depth=2, num_heads=2, stop_sigma=sigma).double()
    ijepa = Predictor((4, 4), embed_dim=16, predictor_embed_dim=8, depth=2, num_heads=2).double()
    ijepa.load_state_dict(stop.state_dict())
    return stop, ijepa


def inputs():
    g = torch.Generator().manual_seed(1)
    masks_x = [torch.stack([torch.randperm(16, generator=g)[:6].sort().values for _ in range(3)])]
    masks = [torch.stack([torch.randperm(16, generator=g)[:4].sort().values for _ in range(3)]) for _ in range(2)]
    x = torch.randn(3, 6, 16, generator=g, dtype=torch.float64)
    return x, masks_x, masks


def test_sigma_zero_equals_ijepa_with_the_projection_bias_as_mask_token():
    stop, ijepa = predictors(0.0)
    with torch.no_grad():
        ijepa.mask_token.copy_(stop.predictor_embed.bias.view(1, 1, -1))
    x, masks_x, masks = inputs()
    torch.testing.assert_close(stop.train()(x, masks_x, masks), ijepa.train()(x, masks_x, masks), rtol=0, atol=1e-12)


def test_noise_goes_through_the_context_projection_and_both_paths_train_it():
    stop, _ = predictors(0.25)
    x, masks_x, masks = inputs()
    noise = [torch.randn(3, 4, 16, dtype=torch.float64) * 0.25 for _ in masks]
    out = stop.train()(x, masks_x, masks, noise=noise)
    g_both = torch.autograd.grad(out.sum(), stop.predictor_embed.weight)[0]
    zero = [torch.zeros_like(n) for n in noise]
    out0 = stop(x, masks_x, masks, noise=zero)
    g_ctx = torch.autograd.grad(out0.sum(), stop.predictor_embed.weight)[0]
    assert not torch.allclose(g_both, g_ctx)  # the noise path contributes to the tied weight
    assert not stop.mask_token.requires_grad
    assert not torch.allclose(out, out0)


def test_eval_is_deterministic_and_training_draws_fresh_noise():
    stop, _ = predictors(0.25)
    x, masks_x, masks = inputs()
    torch.manual_seed(3)
    a, b = stop.train()(x, masks_x, masks), stop(x, masks_x, masks)
    assert not torch.allclose(a, b)
    e1, e2 = stop.eval()(x, masks_x, masks), stop(x, masks_x, masks)
    torch.testing.assert_close(e1, e2, rtol=0, atol=0)
    mean = stop(x, masks_x, masks, noise=[torch.zeros(3, 4, 16, dtype=torch.float64)] * 2)
    torch.testing.assert_close(e1, mean, rtol=0, atol=0)  # eval uses the noise mean (0)
    stop.stop_eval_noise = True  # the official behaviour
    assert not torch.allclose(stop(x, masks_x, masks), e1)
