"""``visrep bench``: every packaged CPU recipe at one equal budget, in one table.

    for recipe in recipes:                     # default: every configs/<method>/fashion_mnist*.yaml
        runs/bench/<recipe>/ <- visrep demo --recipe recipe --minutes M   (a process of its own: peak memory)
        reuse it when it finished before (bench.json), so an interrupted bench resumes
    table: k-NN, linear, 1/2/5-shot, 1 %, steps, img/s, peak MB, health; raw pixels and random init beside

Each recipe is evaluated with its own method's probe features and the run's eval protocols. Rows whose
pretraining saw labels (PAWS's supports, supervised training, captions made from class names) are
marked and ranked apart from the label-free ones. Writes ``bench.md``, ``bench.json`` and, with
matplotlib, ``bench.png``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from visrep.config import CONFIG_DIR
from visrep.errors import ConfigError

COLUMNS = (("k-NN k=20", "k-NN"), ("linear probe", "linear"), ("low-shot 1/class", "1-shot"),
           ("low-shot 2/class", "2-shot"), ("low-shot 5/class", "5-shot"), ("low-shot 1%", "1 %"))


def _recipe_tree(recipe: str) -> dict:
    import yaml

    from visrep.config import resolve_config

    return yaml.safe_load(resolve_config(recipe).read_text()) or {}


def cpu_recipes() -> list[str]:
    """The packaged recipes that run on a laptop CPU from nothing: ``<method>/fashion_mnist*.yaml``, less
    those that need another run's checkpoint (DINOv2 distillation needs its teacher: name it to include it)."""
    out = []
    for p in sorted(CONFIG_DIR.glob("*/fashion_mnist*.yaml")):
        recipe = str(p.relative_to(CONFIG_DIR).with_suffix(""))
        if not (_recipe_tree(recipe).get("method") or {}).get("teacher_checkpoint"):
            out.append(recipe)
    return out


def saw_labels(recipe: str) -> str | None:
    """Why the pretraining of ``recipe`` saw labels (None: label-free)."""
    tree = _recipe_tree(recipe)
    name = (tree.get("method") or {}).get("name")
    if name == "paws":
        return "PAWS's labelled supports"
    if name == "supervised":
        return "supervised training"
    if name in ("clip", "siglip", "llip") and (tree.get("data") or {}).get("caption_templates"):
        return "captions made from the class names"
    return None


def _slug(recipe: str) -> str:
    return recipe.replace("/", "-").replace(".yaml", "")


def fingerprint(recipe: str, minutes: float | None, steps: int | None, overrides: Sequence[str],
                data_root: str | None) -> str:
    """What a bench run depends on: the recipe file's text, the budget, the overrides and the data."""
    import hashlib

    from visrep.config import resolve_config

    what = json.dumps([resolve_config(recipe).read_text(), minutes, steps, list(overrides), data_root])
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def run_one(recipe: str, out: Path, minutes: float | None, steps: int | None, overrides: Sequence[str],
            data_root: str | None, rerun: bool = False) -> dict:
    """Pretrain + evaluate ``recipe`` in a child process (``visrep demo``); returns its bench record. A
    finished run is reused only while its recipe file, the budget and the overrides are the ones it ran
    with (a changed recipe reruns: a table never mixes old and new recipes), and unless ``rerun``. The
    evaluation code is not part of that check: after a change to a method's protocols or features, rerun
    its recipe."""
    done = out / "bench.json"
    key = fingerprint(recipe, minutes, steps, overrides, data_root)
    if rerun and done.is_file():
        print(f"[bench] {recipe}: rerunning as asked (--rerun)", flush=True)
    elif done.is_file():
        record = json.loads(done.read_text())
        if record.get("fingerprint") == key:
            return record
        print(f"[bench] {recipe}: the recipe, budget or overrides changed since {done} was written; rerunning",
              flush=True)
    ov = list(overrides) + ([f"train.max_steps={steps}"] if steps else [])
    cmd = [sys.executable, "-m", "visrep", "demo", "--recipe", recipe, "--out", str(out),
           "--minutes", str(minutes if minutes else 10_000), *(["--data-root", data_root] if data_root else []), *ov]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"bench: {recipe} failed (exit {code}); its output is in {out}; rerun to retry it")
    results = json.loads((out / "results.json").read_text())
    train = json.loads((out / "train_result.json").read_text())
    record = {"recipe": recipe, "saw_labels": saw_labels(recipe), "results": results, "train": train,
              "peak_mb": usage.ru_maxrss / 1024, "fingerprint": key}
    done.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _value(results: dict, row: str, column: str) -> str:
    cell = results.get("table", {}).get(row, {}).get(column)
    if not cell:
        return "-"
    std = cell.get("std")
    return f"{cell['value']:.1f}" + (f" ± {std:.1f}" if std else "")


def format_bench(records: list[dict], budget: str) -> str:
    """One Markdown table: label-free rows first, then the rows that saw labels, then the baselines."""
    head = "| recipe | " + " | ".join(c for _, c in COLUMNS) + " | steps | img/s | peak MB | health |"
    lines = [f"# visrep bench ({budget} per recipe, one machine, one run)", "", head,
             "|" + "---|" * (len(COLUMNS) + 5)]
    ordered = sorted(records, key=lambda r: (r["saw_labels"] is not None, r["recipe"]))
    for r in ordered:
        mark = " (saw labels)" if r["saw_labels"] else ""
        cells = [_value(r["results"], row, "pretrained") for row, _ in COLUMNS]
        t = r["train"]
        lines.append(f"| {r['recipe']}{mark} | " + " | ".join(cells)
                     + f" | {t.get('step', '-')} | {t.get('images_per_sec', 0):.0f} | {r['peak_mb']:.0f} | "
                     f"{t.get('health', '-')} |")
    if records:  # every run evaluates raw pixels on the same split: one row
        ref = records[0]["results"]
        cells = " | ".join(_value(ref, row, "raw pixels") for row, _ in COLUMNS)
        lines.append(f"| raw pixels | {cells} | | | | |")
    lines += ["", "Features each row was probed with (k-NN: cosine, T 0.07, weighted vote; linear: the method's "
              "features; low-shot: the named logistic-regression variant):", ""]
    lines += [f"- {r['recipe']}: {r['train'].get('features', '?')}; low-shot {r['train'].get('lowshot_variant', '?')}"
              for r in ordered]
    lines += ["", "Random init (the same architecture, untrained) per recipe is in each run's results.md.",
              "Rows marked (saw labels) used labels during pretraining: "
              + "; ".join(sorted({f"{r['recipe']}: {r['saw_labels']}" for r in records if r["saw_labels"]}) or "none")
              + ". They are not ranked with the label-free rows."]
    return "\n".join(lines) + "\n"


def plot_bench(records: list[dict], path: Path) -> Path | None:
    """Linear probe and 5-shot per recipe beside raw pixels (matplotlib; None without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install visrep[plots]); no plot written")
        return None

    def val(r, row, col="pretrained"):
        cell = r["results"].get("table", {}).get(row, {}).get(col)
        return cell["value"] if cell else float("nan")

    names = [r["recipe"] + (" *" if r["saw_labels"] else "") for r in records]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(records) + 2), 4))
    xs = range(len(records))
    ax.bar([x - 0.2 for x in xs], [val(r, "linear probe") for r in records], 0.4, label="linear probe")
    ax.bar([x + 0.2 for x in xs], [val(r, "low-shot 5/class") for r in records], 0.4, label="5-shot")
    if records:
        ax.axhline(val(records[0], "linear probe", "raw pixels"), color="C0", ls="--", lw=1, label="raw pixels, linear")
        ax.axhline(val(records[0], "low-shot 5/class", "raw pixels"), color="C1", ls="--", lw=1,
                   label="raw pixels, 5-shot")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("visrep bench (* saw labels during pretraining)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def bench(recipes: Sequence[str] | None = None, *, minutes: float | None = None, steps: int | None = None,
          out_dir: str = "runs/bench", overrides: Sequence[str] = (), data_root: str | None = None,
          readme: str | None = None, rerun: Sequence[str] = ()) -> list[dict]:
    """Run (or reuse) every recipe at the same budget and write the table, JSON and plot; with ``readme``,
    also replace the table between that file's bench markers (:func:`write_into`). The recipes named in
    ``rerun`` run again even where a finished run would be reused."""
    if (minutes is None) == (steps is None):
        raise ValueError("visrep bench: give exactly one budget, --minutes or --steps")
    recipes = list(recipes or cpu_recipes())
    unknown = [r for r in rerun if r not in recipes]
    if unknown:
        raise ConfigError(f"--rerun: {', '.join(unknown)} is not among the recipes of this bench "
                         f"({', '.join(recipes)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i, recipe in enumerate(recipes, 1):
        print(f"[bench {i}/{len(recipes)}] {recipe}", flush=True)
        records.append(run_one(recipe, out / _slug(recipe), minutes, steps, overrides, data_root, recipe in rerun))
    budget = f"{minutes:g} CPU-minutes" if minutes else f"{steps} steps"
    table = format_bench(records, budget)
    (out / "bench.md").write_text(table)
    (out / "bench.json").write_text(json.dumps(records, indent=2) + "\n")
    plot_bench(records, out / "bench.png")
    print(table)
    if readme:
        write_into(readme, table, _command(recipes, minutes, steps, out_dir, overrides))
    return records


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _command(recipes, minutes, steps, out_dir, overrides) -> str:
    budget = f"--minutes {minutes:g}" if minutes else f"--steps {steps}"
    named = "" if list(recipes) == cpu_recipes() else " " + " ".join(recipes)
    return f"visrep bench {budget}{named} --out {out_dir}" + (" --set " + " ".join(overrides) if overrides else "")


def write_into(path: str | Path, table: str, command: str) -> None:
    """Replace what lies between the START and END marker lines of ``path`` with ``table`` (its first
    heading line dropped) and the command that made it; the file is rewritten atomically."""
    from visrep.utils import atomic_write_text

    path = Path(path)
    text = path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{path}: needs exactly one '{START}' line followed by one '{END}' line for the bench table")
    body = "\n".join(table.strip().splitlines()[2:])  # the table and its notes, without the '# visrep bench' title
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    block = f"{START}\nGenerated by `{command}` (do not edit by hand):\n\n{body}\n{END}"
    atomic_write_text(path, head + block + tail)


__all__ = ["bench", "cpu_recipes", "format_bench", "saw_labels"]
