"""Learning test for CLIP, SigLIP and Llip on the procedural multi-caption shapes.

Each method trains its packaged ``<method>/procedural`` recipe for a few hundred steps (one caption
per image and step, drawn from the image's six true captions about shape, colour, size, position
and texture) and must then beat chance, measured in the same run, on zero-shot classification of
two attributes (shape: 6 classes, colour: 8 classes; prompt ensembles in the captions' phrasing) and
on image-text retrieval (R@10 both ways over 200 test images and all their captions).
"""
from __future__ import annotations

import pytest
import torch

from visrep.cli import resolve_config

# (method, steps): Llip leaves the initial plateau (every pair at the trivial logit) later than CLIP
# and SigLIP here (measured: loss still 5.15 after 200 steps, 3.83 after 500)
RUNS = [("clip", 200), ("siglip", 200), ("llip", 400)]


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name, steps", RUNS, ids=[r[0] for r in RUNS])
def test_beats_chance_on_zeroshot_and_retrieval(name, steps, tmp_path):
    from visrep.config import load_config
    from visrep.data.procedural import ProceduralShapes
    from visrep.eval.retrieval import image_text_retrieval
    from visrep.eval.zeroshot import zeroshot_classification
    from visrep.runner import pretrain

    path = resolve_config(f"{name}/procedural")
    epochs = steps * load_config(path).train.batch_size // 2000 + 1     # 2000 procedural training images
    cfg = load_config(path, [f"train.max_steps={steps}", f"train.epochs={epochs}",
                             "train.device=cpu", f"train.out_dir={tmp_path}", "train.ckpt_every=100000"])
    method, result = pretrain(cfg)
    assert result.step == steps and result.losses[-1] < result.losses[0]
    method.eval()
    size = cfg.data.image_size
    for attr in ("shape", "colour"):
        test = ProceduralShapes(num_samples=300, image_size=size, split="test", label=attr)
        images, labels = test.tensors()
        acc = zeroshot_classification(method, images, labels, test.classes, test.templates)
        assert acc["top1"] > 1.5 * acc["chance"], f"{name}: zero-shot {attr} {acc}"
    test = ProceduralShapes(num_samples=200, image_size=size, split="test")
    with torch.no_grad():
        r = image_text_retrieval(method, test.tensors()[0], [test.captions(i) for i in range(200)])
    chance_t2i_r10 = 10 * r["chance_t2i_r1"]
    assert r["t2i_r10"] > 2 * chance_t2i_r10, f"{name}: retrieval {r}"
    assert r["i2t_r10"] > 2 * min(100.0, 10 * r["chance_i2t_r1"]), f"{name}: retrieval {r}"
