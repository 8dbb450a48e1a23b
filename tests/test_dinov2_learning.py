"""DINOv2 learning test: a short real run on Fashion-MNIST beats the same encoder at random init on
k-NN (same run, same subsets, same protocol).

Note: with the official init the random-init [CLS] token is nearly constant (cls token N(0, 1e-6),
LayerScale 1e-5), so the random-init k-NN is near chance (10-15 %); the test also asks for an
absolute k-NN floor so that it is not passed by any non-constant feature.
Measured here (k-NN@20, 10k/5k subsets, 1 thread): 150 steps 66.4 vs 10.5 (57 s of CPU time);
200 steps 69.8.
"""
from __future__ import annotations

import pytest
from test_learning import SEEDED, needs_fmnist

from visrep.cli import resolve_config

STEPS = 150


@pytest.mark.slow
@pytest.mark.timeout(400)
@needs_fmnist
def test_dinov2_beats_random_init_on_knn(tmp_path):
    from visrep.config import load_config
    from visrep.eval import extract_features, knn_classify
    from visrep.runner import load_split, pretrain

    path = resolve_config("dinov2/fashion_mnist")
    batch = load_config(path).train.batch_size
    cfg = load_config(path, [f"train.max_steps={STEPS}", "train.max_minutes=null", "train.progress=false",
                             f"train.out_dir={tmp_path}", "train.ckpt_every=100000",
                             f"train.epochs={STEPS * batch // 60000 + 1}", *SEEDED])
    method, result = pretrain(cfg)
    assert result.step == STEPS
    random_init = method.random_init_baseline()

    (xtr, ytr), (xte, yte) = load_split(cfg, "train").tensors(), load_split(cfg, "test").tensors()
    xtr, ytr, xte, yte = xtr[:10000], ytr[:10000], xte[:5000], yte[:5000]
    acc = {}
    for name, m in (("pretrained", method.eval()), ("random", random_init)):
        ftr, _ = extract_features(m.features, xtr, ytr, progress=False)
        fte, _ = extract_features(m.features, xte, yte, progress=False)
        acc[name] = knn_classify(ftr, ytr, fte, yte, ks=(20,))[20]
    print(f"dinov2: k-NN@20 pretrained {acc['pretrained']:.2f} vs random init {acc['random']:.2f}")
    # over seeds 0, 1, 2 (one thread; 52, 50, 46 s), with the recipe's KoLeo 0.03 and schedule ends (lr flat
    # after the warm-up, weight decay to 0.13, momentum to 0.9925): pretrained 69.38 / 65.82 / 68.16 (std
    # 1.81), gain 58.90 / 58.14 / 58.82 (std 0.42); each bound = smallest - 3 x std, rounded down to a whole
    # number (56.9 -> 56.0; 60.4 -> 60.0). Before (KoLeo 0.1): pretrained 69.84 / 64.62 / 66.88, gain
    # 59.36 / 56.94 / 57.54; before the schedule ends: 69.42 / 64.12 / 66.30; before the sharper
    # temperatures: 67.90 / 64.44 / 65.60.
    assert acc["pretrained"] >= acc["random"] + 56.0, acc
    assert acc["pretrained"] >= 60.0, acc
