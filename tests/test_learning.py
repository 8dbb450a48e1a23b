"""Learning test: a short real I-JEPA run on Fashion-MNIST beats the same encoder at random init.

Both encoders are measured in the same run, on the same subsets, with the same k-NN protocol; the
pretrained one must win by a clear margin. Runs about two to three minutes on one CPU thread.
"""
from __future__ import annotations

import os

import pytest

needs_fmnist = pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")

STEPS = 900
MARGIN = 2.0  # k-NN points


@pytest.mark.slow
@pytest.mark.timeout(900)
@needs_fmnist
def test_ijepa_beats_random_init_on_knn(tmp_path):
    from visrep.config import load_config
    from visrep.eval import extract_features, knn_classify
    from visrep.runner import DEMO_CONFIG, load_split, pretrain

    cfg = load_config(DEMO_CONFIG, [f"train.max_steps={STEPS}", "train.max_minutes=null", "train.threads=1",
                                    "train.progress=false", f"train.out_dir={tmp_path}", "train.ckpt_every=100000",
                                    f"train.epochs={STEPS * cfg_batch() // 60000 + 1}"])
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
    print(f"k-NN@20 pretrained {acc['pretrained']:.2f} vs random init {acc['random']:.2f}")
    assert acc["pretrained"] >= acc["random"] + MARGIN, acc


def cfg_batch() -> int:
    from visrep.config import load_config
    from visrep.runner import DEMO_CONFIG

    return load_config(DEMO_CONFIG).train.batch_size
