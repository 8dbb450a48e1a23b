"""CLIP vs SigLIP vs Llip at the same budget, with Llip's K and temperature ablations.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/vl_compare.py procedural --steps 400
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/vl_compare.py fashion_mnist --steps 400

``procedural``: the ``<method>/procedural`` recipes (32 px shapes, six true captions per image), then
zero-shot top-1 on 500 test images for shape / colour / size / texture (prompt ensembles in the
captions' phrasing) and retrieval R@1/5/10 both ways over those 500 images and all their captions;
Llip also with K = 1, 16 and temperature 1, 10. ``fashion_mnist``: the ``<method>/fashion_mnist``
recipes (class-name captions), zero-shot top-1 on the first 5000 test images. One JSON line per run.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from visrep.config import load_config
from visrep.data.procedural import ProceduralShapes
from visrep.eval.retrieval import image_text_retrieval
from visrep.eval.zeroshot import zeroshot_classification
from visrep.runner import eval_images, load_split, pretrain, uint8_eval_transform

PROCEDURAL_RUNS = [("clip", []), ("siglip", []), ("llip", []),
                   ("llip", ["method.num_mixture_tokens=1"]), ("llip", ["method.num_mixture_tokens=16"]),
                   ("llip", ["method.weight_scale=1"]), ("llip", ["method.weight_scale=10"])]
FMNIST_RUNS = [("clip", []), ("siglip", []), ("llip", [])]


def run(recipe: str, steps: int, overrides: list[str], out: str):
    path = f"visrep/configs/{recipe}.yaml"
    base = [f"train.max_steps={steps}", "train.threads=1", "train.device=cpu", "train.progress=false",
            f"train.out_dir={out}", "train.ckpt_every=1000000", *overrides]
    cfg = load_config(path, base)
    epochs = steps * cfg.train.batch_size // len(load_split(cfg, "train")) + 1   # the run ends at max_steps
    cfg = load_config(path, [*base, f"train.epochs={epochs}"])
    torch.manual_seed(cfg.train.seed)
    method, result = pretrain(cfg)
    return cfg, method.eval(), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", choices=["procedural", "fashion_mnist"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="runs/vl_compare")
    args = parser.parse_args()
    runs = PROCEDURAL_RUNS if args.data == "procedural" else FMNIST_RUNS
    for name, overrides in runs:
        t0 = time.time()
        cfg, method, result = run(f"{name}/{args.data}", args.steps, overrides, f"{args.out}/{name}")
        row = {"method": name, "overrides": overrides, "steps": result.step,
               "loss": [round(result.losses[0], 3), round(result.losses[-1], 3)]}
        size = cfg.data.image_size
        if args.data == "procedural":
            for attr in ("shape", "colour", "size", "texture"):
                test = ProceduralShapes(num_samples=500, image_size=size, split="test", label=attr)
                x, y = test.tensors()
                row[attr] = round(zeroshot_classification(method, x, y, test.classes, test.templates)["top1"], 1)
            test = ProceduralShapes(num_samples=500, image_size=size, split="test")
            r = image_text_retrieval(method, test.tensors()[0], [test.captions(i) for i in range(500)])
            row.update({k: round(v, 1) for k, v in r.items()})
        else:
            x, y = eval_images(load_split(cfg, "test", transform=uint8_eval_transform(size)), size)
            acc = zeroshot_classification(method, x[:5000], y[:5000], method.data_info.classes,
                                          cfg.data.caption_templates)
            row.update({k: round(v, 1) for k, v in acc.items()})
        row["seconds"] = round(time.time() - t0)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
