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
@pytest.mark.timeout(900)
@needs_fmnist
def test_conditioned_iwm_predictor_is_a_better_world_model(tmp_path):
    """Same budget, same seed: the predictor told the transformation ranks the requested target
    higher than one that is not (measured MRR over 8 versions: 0.41 vs 0.33 at 1500 steps, 0.38 vs
    0.33 at 600; chance is 0.34)."""
    import torch

    from visrep.config import load_config
    from visrep.runner import load_split, pretrain

    path = resolve_config("iwm/fashion_mnist")
    mrr = {}
    for conditioning in ("feature", "none"):
        cfg = load_config(path, [f"train.max_steps={MRR_STEPS}", "train.max_minutes=null",
                                 "train.progress=false", f"train.out_dir={tmp_path / conditioning}",
                                 "train.ckpt_every=100000", f"train.epochs={MRR_STEPS * 128 // 60000 + 1}",
                                 f"method.conditioning={conditioning}", *SEEDED])
        method, _ = pretrain(cfg)
        images = load_split(cfg, "test").tensors()[0][:500]
        mrr[conditioning] = method.world_model_mrr(images, n_candidates=8, generator=torch.Generator().manual_seed(0))
    print(f"world-model MRR: conditioned {mrr['feature']:.3f} vs unconditioned {mrr['none']:.3f}")
    assert mrr["feature"] >= mrr["none"] + 0.04, mrr
