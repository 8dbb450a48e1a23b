"""A run at a glance: ``<out_dir>/train.png`` with the loss terms, the lr and the health signals over steps.

Read from ``metrics.jsonl`` at the end of a run (matplotlib is an optional extra: without it, one
line says so and nothing else changes).
"""
from __future__ import annotations

import json
from pathlib import Path

from .health import HEALTH_KEYS

SKIP = {"step", "epoch", "lr", "wd", "elapsed", "images_per_sec", "grad_norm"}


def read_metrics(path: str | Path) -> list[dict]:
    """The training records of ``metrics.jsonl`` (k-NN and notes skipped, a cut last line ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec and "loss" in rec:
            out.append(rec)
    return out


def plot_run(out_dir: str | Path) -> Path | None:
    """Write ``train.png`` (loss terms | lr | health) from the run's ``metrics.jsonl``; None when there is
    nothing to plot or matplotlib is missing."""
    out_dir = Path(out_dir)
    metrics = out_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = read_metrics(metrics)
    if len(records) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed (pip install visrep[plots]); no train.png")
        return None
    steps = [r["step"] for r in records]
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    losses = [k for k in keys if k not in SKIP and k not in HEALTH_KEYS]
    health = [k for k in HEALTH_KEYS if k in keys and k != "rank"]
    panels = [("loss terms", losses), ("lr", ["lr"] if "lr" in keys else []),
              ("effective rank (RankMe)", ["rank"] if "rank" in keys else []), ("health", health)]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for k in names:
            ax.plot(steps, [r.get(k, float("nan")) for r in records], label=k, lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "loss terms" and all(r.get("loss", 1) > 0 for r in records):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "train.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_run", "read_metrics"]
