"""Run several frozen-feature protocols on several feature sets and report them as one table.

Rows are protocol settings ("k-NN k=20", "linear probe", "low-shot 1%", ...), columns are named
feature sets ("pretrained", "random init", "raw pixels", ...).
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from .knn import knn_classify
from .linear import linear_probe
from .lowshot import lowshot_logreg

PROTOCOLS = ("knn", "linear", "lowshot")
_KEYS = ("train_feats", "train_labels", "test_feats", "test_labels")

ProtocolSpec = str | tuple[str, Mapping[str, Any]]


def _as_feature_set(fs, protocol: str | None = None) -> dict[str, Tensor]:
    if isinstance(fs, Mapping) and not all(k in fs for k in _KEYS) and (protocol in fs or "default" in fs):
        fs = fs[protocol] if protocol in fs else fs["default"]  # per-protocol features (DINOv2's linear input)
    if isinstance(fs, Mapping):
        missing = [k for k in _KEYS if k not in fs]
        if missing:
            raise KeyError(f"feature set is missing {missing}")
        out = {k: fs[k] for k in _KEYS}
        if fs.get("linear_inputs") is not None:  # inputs the linear probe sweeps (linear_probe(inputs=...))
            out["linear_inputs"] = fs["linear_inputs"]
        return out
    if isinstance(fs, (tuple, list)) and len(fs) == 4:
        return dict(zip(_KEYS, fs))
    raise TypeError("a feature set is a mapping with train_feats/train_labels/test_feats/test_labels "
                    "or a 4-tuple in that order")


def _knn_label(k: int, kwargs: Mapping[str, Any]) -> str:
    extras = [v for v, default in ((kwargs.get("weighting", "exp"), "exp"), (kwargs.get("metric", "cosine"), "cosine"))
              if v != default]
    return f"k-NN k={k}" + (f" ({', '.join(extras)})" if extras else "")


def _run_one(protocol: str, kwargs: Mapping[str, Any], fs: dict[str, Tensor]) -> tuple[dict[str, dict], Any]:
    """Run one protocol; returns ``({row: {"value", "std"}}, raw result)``.

    An optional ``"label"`` entry of ``kwargs`` replaces the row-name prefix ("k-NN", "linear
    probe", "low-shot") so that one protocol can appear twice with different settings.
    """
    kwargs = dict(kwargs)
    label = kwargs.pop("label", None)
    args = (fs["train_feats"], fs["train_labels"], fs["test_feats"], fs["test_labels"])
    if protocol == "knn":
        ks = kwargs.get("ks", (10, 20, 100, 200))
        ks = [int(ks)] if isinstance(ks, int) else [int(k) for k in ks]
        fit = [k for k in ks if k <= len(fs["train_feats"])]  # small sets: the k that fit (DINO's 200 needs 200)
        kwargs["ks"] = tuple(fit or ks)
        raw = knn_classify(*args, **kwargs)
        rows = {(f"{label} k={k}" if label else _knn_label(k, kwargs)): {"value": acc, "std": None}
                for k, acc in raw.items()}
    elif protocol == "linear":
        if "linear_inputs" in fs:
            kwargs.setdefault("inputs", fs["linear_inputs"])
        raw = linear_probe(*args, **kwargs)
        rows = {label or "linear probe": {"value": raw["test_acc"], "std": None}}
    elif protocol == "lowshot":
        raw = lowshot_logreg(*args, **kwargs)
        label = label or ("low-shot" if raw["variant"] == "logistic_eval" else f"low-shot ({raw['variant']})")
        rows = {f"{label} {name}": {"value": r["mean"], "std": r["std"] if len(r["accs"]) > 1 else None}
                for name, r in raw["settings"].items()}
    else:
        raise ValueError(f"unknown protocol {protocol!r}; known: {PROTOCOLS}")
    return rows, raw


def protocols_from_config(cfg: Any) -> list[tuple[str, dict]]:
    """Protocol specs from an eval config (``visrep.config.EvalConfig`` or a mapping with its keys):
    ``protocols``, ``knn_k``, ``knn_temperature``, ``linear_epochs``, ``lowshot_shots``,
    ``lowshot_fraction``, ``lowshot_seeds``, ``lowshot_variant`` and ``lowshot_solver``; missing keys
    keep the protocol defaults."""
    get = (lambda k: cfg.get(k)) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None))
    specs: list[tuple[str, dict]] = []
    for name in get("protocols") or PROTOCOLS:
        kw: dict[str, Any] = {}
        if name == "knn":
            if get("knn_k") is not None:
                kw["ks"] = tuple(get("knn_k"))
            if get("knn_temperature") is not None:
                kw["temperature"] = float(get("knn_temperature"))
        elif name == "linear":
            if get("linear_epochs") is not None:
                kw["epochs"] = int(get("linear_epochs"))
        elif name == "lowshot":
            if get("lowshot_shots") is not None or get("lowshot_fraction") is not None:
                shots = list(get("lowshot_shots") or [])
                frac = get("lowshot_fraction")
                kw["settings"] = tuple(int(k) for k in shots) + ((f"{100 * float(frac):g}%",) if frac else ())
            if get("lowshot_seeds") is not None:
                kw["n_splits"] = int(get("lowshot_seeds"))
            if get("lowshot_variant") is not None:
                kw["variant"] = str(get("lowshot_variant"))
            if get("lowshot_solver") is not None:
                kw["solver"] = str(get("lowshot_solver"))
        specs.append((name, kw))
    return specs


def run_protocols(
    feature_sets: Mapping[str, Any],
    protocols: Sequence[ProtocolSpec] | Any = PROTOCOLS,
    *,
    verbose: bool = True,
) -> dict:
    """Run ``protocols`` on every feature set and collect one results dict.

    ``feature_sets``: ``{column name: feature set}``; a feature set is a mapping with
    ``train_feats``, ``train_labels``, ``test_feats``, ``test_labels`` (as returned by
    ``extract_train_test``) or a 4-tuple in that order, or ``{protocol name: feature set}`` where
    protocols read different features (a protocol it does not name reads its ``"default"`` entry). A
    feature set's optional ``linear_inputs`` (``{name: column indices}``) is the linear probe's input sweep
    (``linear_probe(inputs=...)``, DINOv2's ``eval/linear.py``).
    ``protocols``: names from ``"knn"``,
    ``"linear"``, ``"lowshot"``, or ``(name, kwargs)`` pairs passed to ``knn_classify``,
    ``linear_probe`` or ``lowshot_logreg`` (a protocol may appear several times, e.g. weighted and
    uniform k-NN; give them different ``"label"`` entries if their row names would collide), or an
    eval config object (see ``protocols_from_config``).

    Returns ``{"columns": [...], "rows": [...], "table": {row: {column: {"value", "std"}}},
    "details": {column: [{"protocol", "kwargs", "rows", "result", "time_s"}, ...]}}`` (accuracies
    in %; ``rows`` are the table rows that run produced).
    """
    if not isinstance(protocols, (str, Sequence)):  # an eval config
        protocols = protocols_from_config(protocols)
    elif isinstance(protocols, str):
        protocols = [protocols]
    specs: list[tuple[str, dict]] = []
    for spec in protocols:
        name, kw = (spec, {}) if isinstance(spec, str) else (spec[0], dict(spec[1]))
        if name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {name!r}; known: {PROTOCOLS}")
        specs.append((name, kw))
    columns = list(feature_sets)
    row_order: list[str] = []
    table: dict[str, dict[str, dict]] = {}
    details: dict[str, list] = {}
    for col in columns:
        details[col] = []
        for name, kw in specs:
            fs = _as_feature_set(feature_sets[col], name)
            t0 = time.perf_counter()
            rows, raw = _run_one(name, kw, fs)
            dt = time.perf_counter() - t0
            for row, cell in rows.items():
                if row not in table:
                    table[row] = {}
                    row_order.append(row)
                table[row][col] = cell
            details[col].append({"protocol": name, "kwargs": kw, "rows": list(rows), "result": raw, "time_s": dt})
            if verbose:
                summary = ", ".join(f"{r} {c['value']:.2f}" for r, c in rows.items())
                print(f"[{col}] {name}: {summary} ({dt:.1f}s)", flush=True)
    return {"columns": columns, "rows": row_order, "table": table, "details": details}


def describe_protocols(cfg: Any) -> list[str]:
    """One note per frozen-feature protocol of an eval config: which official protocol produced its rows."""
    get = (lambda k: cfg.get(k)) if isinstance(cfg, Mapping) else (lambda k: getattr(cfg, k, None))
    notes = []
    for name, kw in protocols_from_config(cfg):
        if name == "knn":
            notes.append(f"k-NN: DINOv2's eval/knn.py (cosine, T = {kw.get('temperature', 0.07):g}, softmax-weighted "
                         "vote over the k nearest training images)")
        elif name == "linear":
            notes.append(f"linear probe: {get('linear_epochs') or 10} epochs of SGD on standardised features, lr "
                         "swept and selected on a 10 % validation split (visrep's probe; the input is each "
                         "method's, see features)")
        elif name == "lowshot":
            if kw.get("variant", "logistic_eval") == "logistic_eval":
                notes.append("low-shot: MSN's logistic_eval.py (rows centred + L2-normalised, no intercept, "
                             "lambda = 2.5e-4 / N, cyanure or L-BFGS to its optimum), mean ± std over "
                             f"{kw.get('n_splits', 3)} splits")
            else:
                notes.append("low-shot (visrep): columns centred on the train mean, rows normalised, a bias, "
                             f"l2 = 1e-4, mean ± std over {kw.get('n_splits', 3)} splits")
    return notes


def _cell(cell: Mapping[str, Any] | None, digits: int) -> str:
    if cell is None or cell.get("value") is None or not math.isfinite(cell["value"]):
        return "–"
    text = f"{cell['value']:.{digits}f}"
    if cell.get("std") is not None:
        text += f" ± {cell['std']:.{digits}f}"
    return text


def format_markdown(results: Mapping[str, Any], digits: int = 1, row_header: str = "protocol") -> str:
    """A Markdown table of ``results`` (from ``run_protocols``): rows = protocol settings, columns =
    feature sets, cells = accuracy % (``mean ± std`` over splits for low-shot rows)."""
    cols = list(results["columns"])
    lines = [
        "| " + " | ".join([row_header, *cols]) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|",
    ]
    for row in results["rows"]:
        cells = [_cell(results["table"][row].get(col), digits) for col in cols]
        lines.append("| " + " | ".join([row, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def write_results(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    title: str | None = None,
    notes: Sequence[str] | str | None = None,
    digits: int = 1,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/results.md`` (``format_table``: title, table, notes) and ``<out_dir>/results.json``
    (the whole results dict); returns both paths."""
    return save_results(results, format_table(results, title, notes or (), digits), out_dir)


def format_table(
    results: Mapping[str, Any], title: str | None = None, notes: Sequence[str] | str = (), digits: int = 1
) -> str:
    """The Markdown report: ``# title``, the table of ``format_markdown`` and the notes as a list."""
    if isinstance(notes, str):
        notes = [notes]
    parts = [f"# {title}\n\n" if title else "", format_markdown(results, digits)]
    if notes:
        parts.append("\n" + "".join(f"* {n}\n" for n in notes))
    return "".join(parts)


def save_results(results: Mapping[str, Any], table: str, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write an already formatted ``table`` as ``<out_dir>/results.md`` and ``results`` as
    ``<out_dir>/results.json``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "results.md", out / "results.json"
    md_path.write_text(table)
    json_path.write_text(json.dumps(_jsonable(results), indent=2) + "\n")
    return md_path, json_path
