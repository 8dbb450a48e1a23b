"""IWM's training step equals its loss recomputed independently from the paper, so that a bug in
how the method composes the loss fails a fast test (IWM has no official code to compare with).

Garrido et al., arXiv 2403.00504, section 3: the world model (predictor) predicts the target
encoder's representation of the target view y from the encoder's context tokens of the source view
x, queried by mask tokens at the target positions and told the transformation a_{x->y}:

    loss = mean over (target block j, context block i, sample b, token k, feature)
           of smooth_l1(p(f(x_b[ctx_i]), a_b, m + pos[tgt_j])_k, LN(f_bar(y_b))[tgt_j]_k)

with LN the non-affine layer norm over features (I-JEPA's target normalisation; the paper writes
L2, the I-JEPA code smooth-L1, ``method.loss`` picks) and two conditionings: *feature* (the action
concatenated to each mask token and mixed back to the predictor's width by an MLP; ours adds it
through a learned gate, see ``visrep.models.predictor``) and *sequence* (one extra token per action
parameter, ``a_k * w_k + b_k``, in the predictor's sequence).

The reference below is written per sample and per (target block, context block), from the
method's own submodules (patch embedding, position tables, transformer blocks, norms, the
predictor's embedding / mask token / conditioning layers / projection) on the batch that
``prepare_batch`` prepared: no ``apply_masks``, no batched row ordering, no ``block_tail``, no
``ijepa_loss``. Every weight is perturbed (the conditioning gate opened, the target encoder drifted
away from the encoder) so that every input matters. The step's loss and the gradient of every
encoder and predictor parameter must match the reference in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visrep.config import load_config
from visrep.engine.step import forward_backward
from visrep.methods import DataInfo, Step, build_method

INFO = DataInfo(in_chans=3, image_size=16, num_classes=4, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
TINY = ["data.image_size=16", "model.patch_size=4", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
        "method.pred_emb_dim=16", "method.pred_depth=2", "method.num_pred_masks=3", "method.min_keep=2",
        "method.pred_mask_scale=0.1,0.2"]
STEP = Step(step=0, epoch=0, total_steps=10, steps_per_epoch=5)
B = 4


def build(*overrides):
    """A tiny float64 IWM with every parameter perturbed (so that each one matters)."""
    torch.manual_seed(0)
    iwm = build_method(load_config(None, ["method.name=iwm", *TINY, *overrides]), INFO).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (iwm.encoder, iwm.predictor):
            for p in module.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if hasattr(iwm.predictor, "cond_gate"):
            iwm.predictor.cond_gate.add_(0.7)       # open the gate: the action must change the prediction
        for t, o in zip(iwm.target_encoder.parameters(), iwm.encoder.parameters()):
            t.copy_(o + 0.05 * torch.randn(o.shape, generator=g, dtype=o.dtype))   # EMA drift
    return iwm


def prepared_batch(iwm, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    raw = {"image": torch.randint(0, 256, (B, 3, 20, 20), dtype=torch.uint8, generator=g),
           "label": torch.zeros(B, dtype=torch.long), "index": torch.arange(B)}
    batch = iwm.prepare_batch(raw, g)
    for k in ("image", "target_image", "action"):
        batch[k] = batch[k].double()
    return batch


def _encode(vit, image, keep=None):
    """One image ``[C, H, W]`` through a ViT's parts: tokens ``[1, N or len(keep), D]`` after the final norm."""
    x = vit.patch_embed(image[None]) + vit.pos_embed[:, vit.num_pos_prefix:]
    if keep is not None:
        x = x[:, keep]
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x)


def _predict(pred, ctx, ctx_idx, tgt_idx, a, conditioning):
    """The predictor's parts for one sample, one context block and one target block."""
    pos = pred.predictor_pos_embed[0]
    x = pred.predictor_embed(ctx) + pos[ctx_idx]                        # [1, Nc, d]
    q = (pred.mask_token[0, 0] + pos[tgt_idx])[None]                    # [1, K, d]
    if conditioning == "feature":
        q = q + pred.cond_gate * pred.cond_mlp(torch.cat([q, a.expand(1, q.size(1), -1)], dim=-1))
    elif conditioning == "sequence":
        x = torch.cat([x, (a[:, None] * pred.cond_weight + pred.cond_bias)[None]], dim=1)
    seq = torch.cat([x, q], dim=1)
    for blk in pred.predictor_blocks:
        seq = blk(seq)
    return pred.predictor_proj(pred.predictor_norm(seq))[:, -q.size(1):]


def reference_loss(iwm, batch) -> torch.Tensor:
    m = iwm.cfg
    cond = m.conditioning
    terms, count = [], 0
    for b in range(batch["image"].size(0)):
        with torch.no_grad():  # stop-gradient on the targets
            h = _encode(iwm.target_encoder, batch["target_image"][b])
            h = F.layer_norm(h, (h.size(-1),))                            # non-affine LN over features
        for ctx_mask in batch["masks_enc"]:
            ctx = _encode(iwm.encoder, batch["image"][b], ctx_mask[b])
            for tgt_mask in batch["masks_pred"]:
                z = _predict(iwm.predictor, ctx, ctx_mask[b], tgt_mask[b], batch["action"][b], cond)
                target = h[:, tgt_mask[b]]
                if m.loss == "smooth_l1":
                    terms.append(F.smooth_l1_loss(z, target, reduction="sum"))
                else:
                    terms.append(F.mse_loss(z, target, reduction="sum"))
                count += z.numel()
    return torch.stack(terms).sum() / count


@pytest.mark.parametrize("conditioning, extra", [("feature", []), ("sequence", []), ("none", []),
                                                 ("feature", ["method.loss=l2", "method.context=block",
                                                              "method.num_enc_masks=2",
                                                              "method.enc_mask_scale=0.6,0.9"])])
def test_training_step_equals_the_papers_loss(conditioning, extra):
    iwm = build(f"method.conditioning={conditioning}", *extra)
    batch = prepared_batch(iwm)
    assert not torch.equal(batch["image"], batch["target_image"])         # the views differ
    out = forward_backward(iwm, batch, STEP)
    got = {n: p.grad.clone() for n, p in iwm.named_parameters() if p.grad is not None}
    iwm.zero_grad(set_to_none=True)

    want = reference_loss(iwm, batch)
    torch.testing.assert_close(out["loss"].detach(), want.detach(), rtol=1e-12, atol=0)
    want.backward()
    params = [n for n, p in iwm.named_parameters() if p.requires_grad]
    assert params and all(n.startswith(("encoder.", "predictor.")) for n in params)
    for n, p in iwm.named_parameters():
        if not p.requires_grad:
            assert n not in got, f"{n}: gradient on a frozen parameter"
            continue
        assert p.grad is not None and n in got, f"{n}: no gradient"
        torch.testing.assert_close(got[n], p.grad, rtol=1e-9, atol=1e-12, msg=lambda s, n=n: f"grad {n}: {s}")
    cond_params = [n for n in params if n.startswith("predictor.cond_")]
    if conditioning == "none":
        assert not cond_params
    else:   # the action reaches the loss
        assert cond_params and all(iwm.get_parameter(n).grad.abs().sum() > 0 for n in cond_params)


def test_prepared_views_target_is_clean_source_is_corrupted():
    """``prepare_batch`` feeds the corrupted view to the encoder (``image``) and the clean view to the
    target encoder (``target_image``), and the action says what was done to the source."""
    iwm = build("method.jitter_p=0.0", "method.source_grayscale_p=1.0", "method.source_blur_p=0.0",
                "method.source_solarize_p=0.0", "method.hflip=false", "method.crop_scale=1.0,1.0")
    batch = prepared_batch(iwm)
    mean, std = torch.tensor(INFO.mean).view(1, 3, 1, 1), torch.tensor(INFO.std).view(1, 3, 1, 1)
    source, target = batch["image"].float() * std + mean, batch["target_image"].float() * std + mean
    assert torch.allclose(source, source[:, :1].expand_as(source), atol=1e-5)   # grayscale: channels equal
    assert not torch.allclose(target, target[:, :1].expand_as(target), atol=1e-2)  # the clean colour image
    gray = (0.2989 * target[:, 0] + 0.587 * target[:, 1] + 0.114 * target[:, 2])[:, None]
    torch.testing.assert_close(source, gray.expand_as(source), atol=1e-5, rtol=0)
    assert torch.equal(batch["action"].float(), torch.tensor([[0, 0, 0, 0, 1.0, 0, 0]]).expand(B, -1))
