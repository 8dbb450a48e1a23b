"""PMSN's training step composes its loss as the paper describes (no official code exists, so this is an
independent recomputation, not a fixture).

PMSN (Assran et al., "The Hidden Uniform Cluster Prior in Self-Supervised Learning", ICLR 2023) is MSN with
ME-MAX's uniform prior replaced by a power-law prior over the prototypes: ME-MAX = KL(pbar || U) becomes a KL
divergence between the batch-mean anchor prediction pbar and pi_k = k^-e / sum_j j^-e (k = 1..K, a fixed
prototype order). Everything else is MSN: prototype soft assignments softmax(cos / tau) of the anchors (masked
anchor views + focal views through encoder and head), targets = Sinkhorn(sharpen(assignments of the
unmasked target view through the EMA target, T)) without gradient (here balanced to the prior's marginal when
``sinkhorn_follows_prior``), repeated for every anchor view, cross-entropy H(targets, anchor predictions).

The test takes the model's own intermediate outputs (encoder / head / target / prototypes, called directly),
rewrites every formula above from scratch, and compares the loss, each term and the gradients of the prototypes
and of the online network with ``training_step``'s. A composition bug (a wrong weight or direction of the KL,
the uniform prior left in, the targets from the wrong branch, a missing sharpening or Sinkhorn, ...) fails it.
"""
import pytest
import torch
import torch.nn.functional as F

from visrep.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from visrep.methods.base import DataInfo, Step
from visrep.methods.msn import MSN, PMSNConfig, num_kept
from visrep.models import encode_views
from visrep.optim.factory import resolve_optim_defaults


def build(**method):
    cfg = Config(method=PMSNConfig(num_prototypes=9, hidden_dim=16, output_dim=8, focal_views=2, focal_size=8,
                                   patch_drop=0.25, sharpen=(0.25, 0.35), clip_grad=None, **method),
                 data=DataConfig(image_size=16),
                 model=ModelConfig(patch_size=4, embed_dim=16, depth=1, num_heads=2, class_token=True,
                                   pos_embed="learned"),
                 optim=resolve_optim_defaults(OptimConfig(ipe_scale=1.25)), train=TrainConfig(epochs=1))
    MSN.validate(cfg)
    torch.manual_seed(0)
    method = MSN(cfg, DataInfo(in_chans=3, image_size=16)).double().train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # a target that differs from the online network, prototypes spread out
        for p in (*method.target_encoder.parameters(), *method.target_head.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        method.prototypes.mul_(4.0)
    B = 5
    batch = {"target": torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64),
             "anchors": torch.randn(B, 1, 3, 16, 16, generator=g, dtype=torch.float64),
             "focal": torch.randn(B, 2, 3, 8, 8, generator=g, dtype=torch.float64),
             "idx_keep": torch.randperm(16, generator=g)[:num_kept(16, 0.25)].expand(B, -1)}
    return method, batch


def reference_loss(method, batch, step):
    """PMSN's loss written from the paper, on the model's own modules."""
    c = method.cfg
    K = c.num_prototypes
    k = torch.arange(1, K + 1, dtype=torch.float64)
    prior = k ** -c.prior_exponent
    prior = prior / prior.sum()
    T = c.sharpen[0] + (c.sharpen[1] - c.sharpen[0]) * step.step / step.total_steps
    protos = F.normalize(method.prototypes, dim=1)

    def assign(x):
        return torch.softmax(F.normalize(x, dim=1) @ protos.T / c.temperature, dim=1)

    # anchors: masked anchor views (one batched run) then the focal views (another run), view-major
    anchor_views = list(batch["anchors"].transpose(0, 1)) + list(batch["focal"].transpose(0, 1))
    z = encode_views(method.encoder, anchor_views, batch["idx_keep"], method.head)
    p = assign(z)
    with torch.no_grad():
        h = method.target_head(method.target_encoder(batch["target"])[:, 0])
        q = assign(h) ** (1.0 / T)
        q = q / q.sum(1, keepdim=True)
        if c.use_sinkhorn:
            Q = q.T / q.sum()                                      # [K, B], total mass 1
            B = Q.shape[1]
            row = prior if c.sinkhorn_follows_prior else torch.full((K,), 1.0 / K, dtype=torch.float64)
            for _ in range(c.sinkhorn_iters):
                Q = Q / Q.sum(1, keepdim=True) * row[:, None]      # prototype k gets mass row[k]
                Q = Q / Q.sum(0, keepdim=True) / B                 # every sample mass 1/B
            q = (Q * B).T
        q = q.repeat(len(anchor_views), 1)
    ce = -(q * p.log()).sum(1).mean()
    pbar = p.mean(0)
    if c.kl_direction == "mean_to_prior":
        kl = (pbar * (pbar / prior).log()).sum()
    else:
        kl = (prior * (prior / pbar).log()).sum()
    ent = -(p * p.log()).sum(1).mean()
    return ce + c.me_max_weight * kl + c.entropy_weight * ent, ce, kl, ent


@pytest.mark.parametrize("method_kw", [
    {},                                                               # defaults: KL(pbar || pi), Sinkhorn to pi
    {"kl_direction": "prior_to_mean"},                                # lightly's direction
    {"sinkhorn_follows_prior": False, "prior_exponent": 0.5, "me_max_weight": 2.0},
    {"use_sinkhorn": False, "entropy_weight": 0.3, "label_smoothing": 0.0},
], ids=["default", "prior_to_mean", "uniform_sinkhorn_e05_w2", "no_sinkhorn_entropy"])
def test_pmsn_loss_matches_an_independent_recomputation(method_kw):
    method, batch = build(**method_kw)
    assert method.prior is not None
    step = Step(step=3, epoch=0, total_steps=10, steps_per_epoch=10)

    out = method.training_step(batch, step)
    out["loss"].backward()
    ours = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)

    loss, ce, kl, ent = reference_loss(method, batch, step)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    tol = dict(atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(out["ce"].detach(), ce.detach(), **tol)
    torch.testing.assert_close(out["me_max"].detach(), kl.detach(), **tol)
    torch.testing.assert_close(out["entropy"].detach(), ent.detach(), **tol)
    torch.testing.assert_close(out["loss"].detach(), loss.detach(), **tol)
    assert set(ours) == set(ref) and "prototypes" in ref and not any(n.startswith("target") for n in ref)
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")
    # the prior matters here: MSN's uniform ME-MAX on the same predictions is another number
    pbar = out["probs"].detach().mean(0) if "probs" in out else None
    if pbar is not None:
        assert abs(float((pbar * (pbar * len(pbar)).log()).sum()) - float(kl)) > 1e-3


def test_pmsn_prior_is_a_decreasing_power_law_and_reduces_to_msn_when_flat():
    method, batch = build()
    K = method.cfg.num_prototypes
    prior = method.prior.double()
    assert torch.all(prior[1:] < prior[:-1])
    torch.testing.assert_close(prior[0] / prior[-1], torch.tensor(float(K) ** 0.25, dtype=torch.float64))
    # exponent 0: the power law is uniform and PMSN's KL(pbar || pi) is exactly MSN's ME-MAX
    flat, batch = build(prior_exponent=0.0)
    step = Step(step=0, epoch=0, total_steps=10, steps_per_epoch=10)
    with torch.no_grad():
        out = flat.training_step(batch, step)
    msn_cfg_method, _ = build(prior_exponent=0.0)
    msn_cfg_method.prior = None    # MSN's ME-MAX path
    with torch.no_grad():
        ref = msn_cfg_method.training_step(batch, step)
    torch.testing.assert_close(out["me_max"], ref["me_max"], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-12, rtol=1e-10)
