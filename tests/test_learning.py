"""Learning tests: a short real run on Fashion-MNIST beats the same encoder at random init.

Both encoders are measured in the same run, on the same subsets, with the same k-NN protocol; the
pretrained one must win by a clear margin. Each runs one to two minutes on one CPU thread.
Measured here (k-NN@20, 10k/5k subsets, 900 steps): I-JEPA 67.8, StoP 66.6, random init 63.7.
"""
from __future__ import annotations

import os

import pytest

from visrep.config import resolve_config

needs_fmnist = pytest.mark.fashion_mnist  # tests/conftest.py: a skip when missing, a failure under CI=true

# The training seed (init, data order, views, masks) of every learning test: the recipes' seed 0 unless
# VISREP_LEARNING_SEED is set (used to measure each margin's run-to-run spread).
SEED = int(os.environ.get("VISREP_LEARNING_SEED", "0"))
SEEDED = [f"train.seed={SEED}"]

STEPS = 900


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_fmnist
@pytest.mark.parametrize("recipe, margin", [("ijepa/fashion_mnist_demo", 2.0), ("stop/fashion_mnist", 1.5)])
def test_beats_random_init_on_knn(recipe, margin, tmp_path):
    from visrep.config import load_config
    from visrep.eval import extract_features, knn_classify
    from visrep.runner import load_split, pretrain

    path = resolve_config(recipe)
    batch = load_config(path).train.batch_size
    cfg = load_config(path, [f"train.max_steps={STEPS}", "train.max_minutes=null",
                             "train.progress=false", f"train.out_dir={tmp_path}", "train.ckpt_every=100000",
                             f"train.epochs={STEPS * batch // 60000 + 1}", *SEEDED])
    method, result = pretrain(cfg)
    assert result.step == STEPS
    assert result.losses[-1] < result.losses[0]

    random_init = method.random_init_baseline()  # the same architecture and seed, untrained

    (xtr, ytr), (xte, yte) = load_split(cfg, "train").tensors(), load_split(cfg, "test").tensors()
    xtr, ytr, xte, yte = xtr[:10000], ytr[:10000], xte[:5000], yte[:5000]
    acc = {}
    for name, m in (("pretrained", method), ("random", random_init)):
        ftr, _ = extract_features(m.features, xtr, ytr, progress=False)
        fte, _ = extract_features(m.features, xte, yte, progress=False)
        acc[name] = knn_classify(ftr, ytr, fte, yte, ks=(20,))[20]
    print(f"{recipe}: k-NN@20 pretrained {acc['pretrained']:.2f} vs random init {acc['random']:.2f}")
    assert acc["pretrained"] >= acc["random"] + margin, acc


MRR_STEPS = 1200


@pytest.mark.slow
@pytest.mark.timeout(1200)
@needs_fmnist
def test_conditioned_iwm_predictor_is_a_better_world_model(tmp_path, monkeypatch):
    """One feature-conditioned run: its predictor ranks the requested target higher when told the
    right transformation than when told another sample's (the action rolled over the batch: the
    same network, views, masks and candidates; only the action is wrong).

    Measured earlier (MRR over 8 versions, 1200 steps, seed 0): right action 0.397, another sample's
    0.334, and a separately trained unconditioned predictor 0.331 (a baseline that needs a second run;
    chance is 0.34): the two baselines agree, so the test trains once. Over seeds 0, 1, 2 now (one
    thread, two learning runs at a time): right 0.441 / 0.418 / 0.468 vs other 0.329 / 0.326 / 0.328,
    gain 0.112 / 0.092 / 0.140, std 0.024: margin 0.092 - 3 x 0.024 = 0.020, rounded down to 0.015.
    198, 225, 216 s; the timeout is 5x that (training once took 1462 s on 2 cores shared at load ~8)."""
    import torch

    import visrep.methods.iwm as iwm_module
    from visrep.config import load_config
    from visrep.runner import load_split, pretrain

    cfg = load_config(resolve_config("iwm/fashion_mnist"),
                      [f"train.max_steps={MRR_STEPS}", "train.max_minutes=null", "train.progress=false",
                       f"train.out_dir={tmp_path}", "train.ckpt_every=100000",
                       f"train.epochs={MRR_STEPS * 128 // 60000 + 1}", "method.conditioning=feature", *SEEDED])
    method, _ = pretrain(cfg)
    images = load_split(cfg, "test").tensors()[0][:500]
    mrr = {"right": method.world_model_mrr(images, n_candidates=8, generator=torch.Generator().manual_seed(0))}
    real_action = iwm_module.action
    monkeypatch.setattr(iwm_module, "action", lambda ps, pt, spec: real_action(ps, pt, spec).roll(1, 0))
    mrr["other"] = method.world_model_mrr(images, n_candidates=8, generator=torch.Generator().manual_seed(0))
    print(f"world-model MRR: right action {mrr['right']:.3f} vs another sample's {mrr['other']:.3f}")
    assert mrr["right"] >= mrr["other"] + 0.015, mrr
