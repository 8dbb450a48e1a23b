"""World-model MRR: the pure ranking function, and IWM's protocol end to end on a tiny model."""
from __future__ import annotations

import pytest
import torch

from visrep.config import load_config
from visrep.eval.world_model import reciprocal_ranks
from visrep.methods import DataInfo, build_method


def test_reciprocal_ranks_perfect_and_ignorant_predictors():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3, 5, 4, 2, generator=g)
    assert torch.equal(reciprocal_ranks(bank.clone(), bank), torch.ones(3, 5))   # predicts what it is asked
    same = bank[:, :1].expand(-1, 5, -1, -1)                                        # always predicts version 0
    rr = reciprocal_ranks(same, bank)
    assert torch.all(rr[:, 0] == 1.0) and torch.all(rr[:, 1:] < 1.0)
    tie = torch.zeros(1, 4, 1, 1)                                                   # all versions identical
    assert torch.allclose(reciprocal_ranks(tie, tie), torch.full((1, 4), 0.25))   # ties count against
    with pytest.raises(ValueError, match=r"\[B, N, T, D\]"):
        reciprocal_ranks(bank, bank[:, :2])


def test_iwm_world_model_mrr_runs_and_is_a_rank():
    cfg = load_config(None, ["method.name=iwm", "data.image_size=16", "model.patch_size=4", "model.embed_dim=32",
                             "model.depth=1", "model.num_heads=2", "method.pred_emb_dim=16", "method.pred_depth=1",
                             "method.num_pred_masks=2", "method.min_keep=2", "method.pred_mask_scale=0.1,0.2"])
    torch.manual_seed(0)
    m = build_method(cfg, DataInfo(in_chans=3, image_size=16, num_classes=2, mean=(0.5,) * 3, std=(0.25,) * 3))
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    a = m.world_model_mrr(images, n_candidates=4, generator=torch.Generator().manual_seed(1))
    b = m.world_model_mrr(images, n_candidates=4, generator=torch.Generator().manual_seed(1))
    assert a == b and 0.25 <= a <= 1.0 and m.training  # deterministic, a rank, training mode restored


def _tiny(name: str, extra=()):
    cfg = load_config(None, [f"method.name={name}", "data.image_size=16", "model.patch_size=4", "model.embed_dim=32",
                             "model.depth=1", "model.num_heads=2", "method.pred_emb_dim=16", "method.pred_depth=1",
                             "method.num_pred_masks=2", "method.min_keep=2", "method.pred_mask_scale=0.1,0.2", *extra])
    torch.manual_seed(0)
    return build_method(cfg, DataInfo(in_chans=3, image_size=16, num_classes=3, mean=(0.5,) * 3, std=(0.25,) * 3))


@pytest.mark.parametrize("name", ["ijepa", "stop", "iwm"])
def test_predictor_finetune_runs_every_reference_and_keeps_the_method(name, monkeypatch):
    """Each of the three runs is the reference its name says, checked against what the protocol
    hands the classifier trainer (recorded by a pass-through spy) and an independent computation of
    its inputs: the frozen *target* encoder's tokens (the target encoder is drifted away from the
    encoder so that the two differ); the pretrained predictor a copy of the method's at lr / 10, the
    random predictor the same architecture with other weights at lr, the attentive probe no
    predictor; a fresh head each; each top-1 reported under its own name; the method untouched."""
    import visrep.methods.jepa as ijepa_module  # the JEPA family module holds predictor_finetune

    m = _tiny(name)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in m.target_encoder.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    train = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (24,), generator=g)
    test = torch.randint(0, 256, (9, 3, 16, 16), dtype=torch.uint8), torch.randint(0, 3, (9,), generator=g)

    calls = []
    real = ijepa_module.train_classifier

    def spy(model, groups, tr, te, **kw):
        record = {"predictor": model.predictor, "head": model.head, "tr": tr, "te": te,
                  "lrs": [(set(map(id, gr["params"])), gr["lr"]) for gr in groups],
                  "pred_state": None if model.predictor is None else
                  {k: v.clone() for k, v in model.predictor.state_dict().items()}}
        record["out"] = real(model, groups, tr, te, **kw)
        calls.append(record)
        return record["out"]

    monkeypatch.setattr(ijepa_module, "train_classifier", spy)
    lr = 1e-3
    out = m.predictor_finetune(train, test, epochs=2, lr=lr, batch_size=8, generator=torch.Generator().manual_seed(1))
    names = ["pretrained predictor", "random predictor", "attentive probe"]
    assert list(out) == names and len(calls) == 3
    assert all(0.0 <= v <= 100.0 for v in out.values())
    for n, call in zip(names, calls):
        assert out[n] == call["out"]["top1"], n

    # the inputs: the target encoder's last-layer tokens of the (already 16 px) images, in eval mode
    with torch.no_grad():
        want_tr = m.target_encoder.eval()(m.normalize(train[0].float() / 255))
        want_te = m.target_encoder(m.normalize(test[0].float() / 255))
        online = m.encoder.eval()(m.normalize(train[0].float() / 255))
    m.train()
    assert not torch.allclose(want_tr, online, atol=1e-3)
    for call in calls:
        torch.testing.assert_close(call["tr"][0], want_tr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(call["te"][0], want_te, atol=1e-5, rtol=1e-5)
        assert torch.equal(call["tr"][1], train[1]) and torch.equal(call["te"][1], test[1])

    heads = [call["head"] for call in calls]
    assert len({id(h) for h in heads}) == 3 and not any(h is m.predictor for h in heads)
    pre, rnd, probe = calls
    own = m.predictor.state_dict()
    assert pre["predictor"] is not m.predictor and pre["pred_state"].keys() == own.keys()
    assert all(torch.equal(pre["pred_state"][k], before[f"predictor.{k}"]) for k in own)
    assert rnd["predictor"] is not None and rnd["pred_state"].keys() == own.keys()
    assert all(rnd["pred_state"][k].shape == own[k].shape for k in own)
    assert not torch.equal(rnd["pred_state"]["predictor_embed.weight"], own["predictor_embed.weight"])
    assert probe["predictor"] is None

    def lr_of(call, module):
        ids = set(map(id, module.parameters()))
        return [r for p, r in call["lrs"] if p == ids]

    for call in calls:
        assert lr_of(call, call["head"]) == [lr]
    assert lr_of(pre, pre["predictor"]) == [lr / 10] and lr_of(rnd, rnd["predictor"]) == [lr]
    assert len(probe["lrs"]) == 1
    # the method's own predictor and encoders are untouched (the protocol tunes a copy)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_attentive_head_learns_a_token_rule():
    """The attentive pooler must find the one informative token (marked by its content) among distractors."""
    from visrep.eval.finetune import AttentivePooler, train_classifier

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 6, 8, generator=g)
    where = torch.randint(0, 6, (1200,), generator=g)
    x[torch.arange(1200), where, 7] = 4.0                       # the marked token
    marked = x[torch.arange(1200), where]
    y = (marked[:, 0] > marked[:, 1]).long()                     # its features decide the class
    torch.manual_seed(0)
    head = AttentivePooler(8, 2, num_heads=2)   # measured over init seeds 0-4: 94-96.5 % after 30 epochs
    out = train_classifier(head, [{"params": list(head.parameters()), "lr": 3e-3}], (x[:1000], y[:1000]),
                           (x[1000:], y[1000:]), epochs=30, batch_size=50, generator=g)
    assert out["top1"] > 90.0, out
