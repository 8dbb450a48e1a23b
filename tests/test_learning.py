"""Learning tests: a short real run on Fashion-MNIST beats the same encoder at random init.

Both encoders are measured in the same run, on the same subsets (10k / 5k), with the same protocols;
the pretrained one must win by a margin. Each runs one to two minutes on one CPU thread.
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
# Linear-probe margins over the mean of 8 random inits, and StoP's floor on its own accuracy, from 5 seeds:
# see test_beats_random_init_on_linear_probe
IJEPA_MARGIN, STOP_MARGIN = 0.0, 2.5
FLOOR = {"stop/fashion_mnist": 66.5}
# I-JEPA and StoP: warm-up 0.2 epochs (94 steps) instead of the demo recipes' 0.03 (14 steps). Without it
# some seeds fall into a low-rank state in the first steps (seed 2: RankMe 1.6 at step 20, 3.3 at step
# 320, the JEPA loss already at 0.055) and recover only slowly: linear-probe gains over random init of
# 7.3 / 11.0 / 1.5 points (seeds 0 / 1 / 2, k-NN -4.2 at seed 2); 1800 steps still gave 13.3 / 14.4 / 6.7.
WARMUP = ["optim.warmup_epochs=0.2"]
RANDOM_INIT_SEEDS = range(8)  # the averaged random-init baseline: 3.5 s each


@pytest.mark.slow
@pytest.mark.timeout(600)
@needs_fmnist
@pytest.mark.parametrize("recipe, margin", [("ijepa/fashion_mnist_demo", IJEPA_MARGIN),
                                            ("stop/fashion_mnist", STOP_MARGIN)])
def test_beats_random_init_on_linear_probe(recipe, margin, tmp_path):
    """Linear probe (the I-JEPA paper's protocol on average-pooled target-encoder tokens) against the
    mean of 8 random inits (seeds 0-7, 3.5 s each, measured in the run); the run's own init and k-NN@20
    are printed, not asserted. Over training seeds 0-4 (one thread, two learning runs at a time),
    margin <= mean gain - 3 x std (slack of 3x the run-to-run spread), rounded down to 0.5:

        recipe   pretrained linear                     gain over mean init (64.40)        std   margin
        I-JEPA   70.70, 67.72, 72.10, 70.06, 73.24     6.30, 3.32, 7.70, 5.66, 8.84      2.10   0.0
        StoP     70.86, 72.10, 71.06, 68.86, 72.28     6.46, 7.70, 6.66, 4.46, 7.88      1.36   2.5

    The random inits themselves (63.30, 62.90, 65.76, 64.88, 62.96, 64.90, 64.76, 65.74; std 1.18)
    spread about as much as StoP's pretrained accuracy, so a baseline of one init (the run's own, as
    before) doubled the gain's spread: gains 7.56, 9.20, 5.30, 3.98, 9.32 (StoP, std 2.37) and 7.40,
    4.82, 6.34, 5.18, 10.28 (I-JEPA, std 2.19). StoP also has a floor on its own accuracy by the same
    rule: 71.03 - 3 x 1.36 = 66.9, rounded down to 66.5, above the mean init (I-JEPA's, 64.4, is not).
    At 900 steps the JEPA gains vary by about a third of their size from seed to seed: the spread is the
    training's (evaluating on all 60k / 10k images did not narrow it: I-JEPA 6.93 / 4.27 / 6.94, StoP
    7.67 / 7.85 / 4.96 at seeds 0-2), and 1800 steps did not help (gains over the own init 13.3 / 14.4 /
    6.7 and 10.56 / 13.32 / 7.80). 115-125 s each (one thread, two runs at a time).
    """
    from visrep.config import load_config
    from visrep.eval import extract_features, knn_classify
    from visrep.eval.linear import linear_probe
    from visrep.runner import load_split, pretrain

    path = resolve_config(recipe)
    batch = load_config(path).train.batch_size
    cfg = load_config(path, [f"train.max_steps={STEPS}", "train.max_minutes=null",
                             "train.progress=false", f"train.out_dir={tmp_path}", "train.ckpt_every=100000",
                             f"train.epochs={STEPS * batch // 60000 + 1}", *WARMUP, *SEEDED])
    method, result = pretrain(cfg)
    assert result.step == STEPS
    assert result.losses[-1] < result.losses[0]

    (xtr, ytr), (xte, yte) = load_split(cfg, "train").tensors(), load_split(cfg, "test").tensors()
    xtr, ytr, xte, yte = xtr[:10000], ytr[:10000], xte[:5000], yte[:5000]

    def linear_and_knn(m):
        ftr, _ = extract_features(m.features, xtr, ytr, progress=False)
        fte, _ = extract_features(m.features, xte, yte, progress=False)
        return linear_probe(ftr, ytr, fte, yte, seed=0)["test_acc"], knn_classify(ftr, ytr, fte, yte, ks=(20,))[20]

    acc = {"pretrained": linear_and_knn(method),
           "random": linear_and_knn(method.random_init_baseline())}  # its own initial weights, untrained
    inits = [linear_and_knn(method.random_init_baseline(seed=s))[0] for s in RANDOM_INIT_SEEDS]
    acc["random_mean"] = (sum(inits) / len(inits), float("nan"))
    print(f"{recipe}: linear / k-NN@20 pretrained {acc['pretrained'][0]:.2f} / {acc['pretrained'][1]:.2f} "
          f"vs random init {acc['random'][0]:.2f} / {acc['random'][1]:.2f}, mean of {len(inits)} random inits "
          f"{acc['random_mean'][0]:.2f} ({', '.join(f'{a:.2f}' for a in inits)})")
    assert acc["pretrained"][0] >= acc["random_mean"][0] + margin, acc
    assert acc["pretrained"][0] >= FLOOR.get(recipe, 0.0), acc


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
