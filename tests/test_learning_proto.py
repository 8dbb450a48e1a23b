"""Learning test for the prototype family: a short MSN run on Fashion-MNIST beats the same encoder
at random init on 5-shot logistic regression (the family's claim is label efficiency), both
measured in the same run on the same subsets (k-NN is printed, not asserted: after 150 steps its
margin is about one point).

Measured here (msn/fashion_mnist): this test (150 steps, 2 focal views, 5k/2k subsets): 5-shot
43.8 vs 38.3 at random init, k-NN@20 60.1 vs 59.0; 300 steps with 4 focal views on 10k/5k: 5-shot
46.4 vs 35.4, k-NN@20 67.1 vs 61.5. The step takes ~0.4 s at one thread on an idle 2-core machine
(the 150 steps ran far slower here with 4 engineers sharing the CPU).

Margins follow one rule (as in test_learning_vl.py): each gain (pretrained - baseline) measured with
VISREP_LEARNING_SEED 0, 1, 2 (one thread, two learning runs at a time, as `./dev test` runs them);
margin = smallest gain - 3 x spread, rounded down, where the spread is the sample standard deviation
of the gain over the 3 seeds: every margin has a slack of at least 3x its run-to-run spread. Timeouts
are about 5x the slowest of the three runs.

    test   metric                     gains s0, s1, s2      std    margin   time (s0, s1, s2)
    MSN    5-shot (150 steps)          7.65, 7.40, 5.57     1.14    2.0     45, 56, 86 s
    PAWS   soft-NN (300 steps)        14.10, 17.65, 17.00   1.89    8.0     115, 252, 252 s

(seed 0 in `./dev test`'s two lanes on a quiet machine; seeds 1 and 2 shared the 2 cores with two more runs)
"""
from __future__ import annotations

import pytest
from test_learning import SEEDED, needs_fmnist

from visrep.cli import resolve_config

STEPS = 150


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_fmnist
def test_msn_beats_random_init_on_5shot(tmp_path):
    from visrep.config import load_config
    from visrep.eval import extract_features, knn_classify
    from visrep.eval.lowshot import lowshot_logreg
    from visrep.runner import load_split, pretrain

    cfg = load_config(resolve_config("msn/fashion_mnist"),
                      [f"train.max_steps={STEPS}", "train.max_minutes=null", "train.progress=false",
                       f"train.out_dir={tmp_path}", "train.ckpt_every=100000", "train.epochs=1",
                       "method.focal_views=2", *SEEDED])
    method, result = pretrain(cfg)
    assert result.step == STEPS
    random_init = method.random_init_baseline()
    (xtr, ytr), (xte, yte) = load_split(cfg, "train").tensors(), load_split(cfg, "test").tensors()
    xtr, ytr, xte, yte = xtr[:5000], ytr[:5000], xte[:2000], yte[:2000]
    acc = {}
    for name, m in (("pretrained", method.eval()), ("random", random_init)):
        ftr, _ = extract_features(m.features, xtr, ytr, progress=False)
        fte, _ = extract_features(m.features, xte, yte, progress=False)
        shot = lowshot_logreg(ftr, ytr, fte, yte, settings=(5,), n_splits=3)["settings"]["5/class"]["mean"]
        acc[name] = (shot, knn_classify(ftr, ytr, fte, yte, ks=(20,))[20])
    print(f"MSN 5-shot / k-NN@20: pretrained {acc['pretrained']} vs random init {acc['random']}")
    assert acc["pretrained"][0] >= acc["random"][0] + 2.0, acc  # margin: see the module docstring


PAWS_STEPS = 300


@pytest.mark.slow
@pytest.mark.timeout(800)
@needs_fmnist
def test_paws_beats_random_init_on_soft_nn(tmp_path):
    """PAWS with 10 labels per class: soft nearest neighbours over those 100 labelled images (the
    paper's evaluation) after a short run vs the same network at random init. Measured here: 200 steps
    47.0 vs 37.6 (69 s at one thread); 100 steps 40.9 vs 37.6; 300 steps 55.0. After the views moved to
    StreamSpec.crops and PAWS's schedules to the official step convention, 200 steps gave 41.85 vs 37.55
    (one seed): 300 steps now; over 3 seeds the gain is 14.1 / 17.65 / 17.0 (std 1.89): margin 8.0.
    (Whether it beats the same ViT trained supervised on the 100 images is a longer-budget claim:
    at 300 steps it does not -- soft-NN 55.0 vs supervised 61.2, see README.)"""
    from visrep.config import load_config
    from visrep.runner import load_split, pretrain

    cfg = load_config(resolve_config("paws/fashion_mnist"),
                      [f"train.max_steps={PAWS_STEPS}", "train.max_minutes=null", "train.progress=false",
                       f"train.out_dir={tmp_path}", "train.ckpt_every=100000", "train.epochs=1", *SEEDED])
    method, result = pretrain(cfg)
    assert result.step == PAWS_STEPS
    random_init = method.random_init_baseline()
    (xtr, ytr), (xte, yte) = load_split(cfg, "train").tensors(), load_split(cfg, "test").tensors()
    acc = {name: m.eval().snn_accuracy(xtr, ytr, xte[:2000], yte[:2000])
           for name, m in (("pretrained", method), ("random", random_init))}
    print(f"PAWS soft-NN over 100 labels: pretrained {acc['pretrained']:.2f} vs random init {acc['random']:.2f}")
    assert acc["pretrained"] >= acc["random"] + 8.0, acc
