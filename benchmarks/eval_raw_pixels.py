"""Calibrate the frozen-feature protocols with raw pixels on Fashion-MNIST.

Raw pixels (784-d, scaled to [0, 1]) are used as the "features"; the protocols should land near the
known raw-pixel baselines on the test set:

    k-NN (k=5, uniform, Euclidean)               85.5
    logistic regression, all labels              84.5
    logistic regression, 1% of the labels        78.2
    logistic regression, 5 labels per class      63.9

Usage::

    python benchmarks/eval_raw_pixels.py [--root /usr/share/datasets/fashion-mnist] [--threads N]
                                         [--full-logreg] [--out runs/eval_raw_pixels]
"""
from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from visrep.eval import format_markdown, run_protocols, write_results  # noqa: E402

BASELINES = {
    "k-NN k=5 (uniform, euclidean)": 85.5,
    "linear probe": 84.5,  # baseline: plain logistic regression on all labels
    "logistic regression (L-BFGS) 100%": 84.5,
    "low-shot 5/class": 63.9,
    "low-shot 1%": 78.2,
}


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """IDX files: 16-byte header for images, 8-byte header for labels."""
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28 * 28)
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    assert images.shape[0] == labels.shape[0]
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--full-logreg", action="store_true",
                    help="also fit L-BFGS logistic regression on all 60k labels (slow: ~2 min of CPU)")
    ap.add_argument("--out", type=Path, default=None, help="write results.md / results.json here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    xtr, ytr = load_split(args.root, "train")
    xte, yte = load_split(args.root, "t10k")
    print(f"loaded {tuple(xtr.shape)} train / {tuple(xte.shape)} test in {time.perf_counter() - t0:.1f}s "
          f"({torch.get_num_threads()} threads)", flush=True)

    protocols = [
        ("knn", {"ks": 5, "weighting": "uniform", "metric": "euclidean"}),
        ("knn", {"ks": (10, 20)}),  # DINO-style: cosine, exp(sim / 0.07) votes
        ("linear", {}),
        ("lowshot", {}),
    ]
    if args.full_logreg:
        # the low-shot default l2 (1e-4, chosen for few labels) over-regularises 60k labels: weaker here
        protocols.append(("lowshot", {"settings": ("100%",), "n_splits": 1, "l2": 1e-6, "dtype": torch.float32,
                                      "max_iter": 200, "label": "logistic regression (L-BFGS)"}))
    results = run_protocols({"raw pixels": (xtr, ytr, xte, yte)}, protocols)

    row_time = {row: d["time_s"] for d in results["details"]["raw pixels"] for row in d["rows"]}

    results["columns"].append("baseline")
    for row, value in BASELINES.items():
        if row in results["table"]:
            results["table"][row]["baseline"] = {"value": value, "std": None}

    print()
    print(f"{'protocol':36s} {'ours':>13s} {'baseline':>9s} {'delta':>7s} {'time':>7s}")
    for row in results["rows"]:
        cell = results["table"][row]["raw pixels"]
        ours = f"{cell['value']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
        base = BASELINES.get(row)
        delta = f"{cell['value'] - base:+.2f}" if base is not None else ""
        print(f"{row:36s} {ours:>13s} {base if base is not None else '':>9} {delta:>7s} {row_time[row]:6.1f}s")
    linear = next(d["result"] for d in results["details"]["raw pixels"] if d["protocol"] == "linear")
    print(f"\nlinear probe: best lr={linear['best']['lr']} wd={linear['best']['wd']} "
          f"(val {linear['best']['val_acc']:.2f}); sweep test accs: "
          + ", ".join(f"{r['lr']:g}:{r['test_acc']:.2f}" for r in linear["table"]))
    print(f"total {time.perf_counter() - t0:.1f}s")
    if args.out is not None:
        md, js = write_results(results, args.out, title="Fashion-MNIST, raw pixels as features",
                               notes="k-NN timings and protocol details are in results.json.")
        print(f"wrote {md} and {js}")
    else:
        print()
        print(format_markdown(results))


if __name__ == "__main__":
    main()
