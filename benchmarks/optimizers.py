"""Critical-gradient optimizers against their base optimizers, same seeds, same hyper-parameters.

Pairs: SGD (momentum 0.9) vs SGDC, Adam vs AdamC, RMSprop vs RMSpropC (default paper mode of
:mod:`visrep.optim.critical`, ``topc=5, decay=0.7`` as in the reference README). Problems:

(a) ``logreg``: L2-regularised logistic regression on synthetic ill-conditioned data (strongly convex),
    minibatches of 64. Loss = suboptimality ``f - f*`` of the full-data objective (``f*`` from L-BFGS);
    target: 3 % of the gap at ``w = 0`` (``log 2 - f*``); final = suboptimality and held-out accuracy.
(b) ``fmnist``: an MLP (784-256-10) on Fashion-MNIST (Debian IDX files), one epoch over a training subset.
    Target: EMA (0.9) of the minibatch loss below 0.6; final = test loss and accuracy.

Reported per run: steps to target, final loss / accuracy, wall time per training step and per
``optimizer.step()``, optimizer-state memory (the buffer costs ``topc`` gradient copies) and, on CUDA, the
peak allocated memory; then ratios C-variant / base. Markdown on stdout, JSON with ``--out``.

    python -m benchmarks.optimizers --quick --out /tmp/cgo.json   # from the repo root
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visrep.optim.critical import SGDC, AdamC, RMSpropC

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MEMORY = dict(topc=5, decay=0.7)


@dataclass
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], Iterator[tuple[torch.Tensor, torch.Tensor]]]
    loss: Callable[[torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]
    evaluate: Callable[[nn.Module], tuple[float, float]]  # final (loss, accuracy)
    progress: Callable[[nn.Module], float] | None  # value compared with target; None: EMA (0.9) of batch losses
    target: float
    lrs: dict[str, float]


@dataclass
class RunResult:
    steps_to_target: int | None
    final_loss: float
    final_acc: float
    ms_per_step: float
    opt_ms_per_step: float
    state_mb: float
    peak_mb: float | None


def _optimizers(lrs: dict[str, float]) -> dict[str, Callable]:
    return {
        "SGD": lambda p: torch.optim.SGD(p, lr=lrs["SGD"], momentum=0.9),
        "SGDC": lambda p: SGDC(p, lr=lrs["SGD"], momentum=0.9, **MEMORY),
        "Adam": lambda p: torch.optim.Adam(p, lr=lrs["Adam"]),
        "AdamC": lambda p: AdamC(p, lr=lrs["Adam"], **MEMORY),
        "RMSprop": lambda p: torch.optim.RMSprop(p, lr=lrs["RMSprop"]),
        "RMSpropC": lambda p: RMSpropC(p, lr=lrs["RMSprop"], **MEMORY),
    }


def logreg_problem(quick: bool, device: torch.device) -> Problem:
    """Synthetic logistic regression, L2 weight ``lam`` on the weights; tracked by the full-data suboptimality."""
    n, d, lam, batch = (4096, 32, 1e-3, 64) if quick else (16384, 64, 1e-3, 64)
    steps = 300 if quick else 1500
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(d, generator=g)
    x = torch.randn(2 * n, d, generator=g) * torch.linspace(0.05, 3.0, d)  # ill-conditioned features
    y = (torch.rand(2 * n, generator=g) < torch.sigmoid(x @ w_true)).float()
    x, y, x_test, y_test = x[:n].to(device), y[:n].to(device), x[n:].to(device), y[n:].to(device)

    def objective(logits: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), target) + 0.5 * lam * model.weight.square().sum()

    def make_model() -> nn.Module:
        return nn.Linear(d, 1).to(device)

    opt_model = make_model()
    lbfgs = torch.optim.LBFGS(opt_model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-10,
                              tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = objective(opt_model(x), y, opt_model)
        loss.backward()
        return loss

    for _ in range(5):
        lbfgs.step(closure)
    with torch.no_grad():
        f_star = float(objective(opt_model(x), y, opt_model))

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(steps):
            idx = torch.randint(n, (batch,), generator=gen).to(device)
            yield x[idx], y[idx]

    @torch.no_grad()
    def suboptimality(model: nn.Module) -> float:
        return float(objective(model(x), y, model)) - f_star

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        acc = ((model(x_test).squeeze(-1) > 0).float() == y_test).float().mean()
        return suboptimality(model), float(acc)

    return Problem("logreg", make_model, batches, objective, evaluate, suboptimality,
                   target=0.03 * (math.log(2.0) - f_star), lrs={"SGD": 0.05, "Adam": 1e-2, "RMSprop": 1e-2})


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fmnist_problem(quick: bool, device: torch.device, data_dir: Path = FMNIST_DIR) -> Problem:
    """One epoch of an MLP over a (quick: 16k image) training subset, batch 64; test on t10k (quick: 2k)."""
    n_train, n_test = (16384, 2000) if quick else (60000, 10000)

    def load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = _read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")[:n]
        labels = _read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")[:n]
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        return ((x - 0.2860) / 0.3530).to(device), torch.from_numpy(labels.astype(np.int64)).to(device)

    x, y = load("train", n_train)
    x_test, y_test = load("t10k", n_test)

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)

    def batches(gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in torch.randperm(n_train, generator=gen).split(64):
            idx = idx.to(device)
            yield x[idx], y[idx]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> tuple[float, float]:
        logits = model(x_test)
        return float(F.cross_entropy(logits, y_test)), float((logits.argmax(1) == y_test).float().mean())

    return Problem("fmnist", make_model, batches, lambda out, t, m: F.cross_entropy(out, t), evaluate, None,
                   target=0.6, lrs={"SGD": 0.05, "Adam": 1e-3, "RMSprop": 1e-3})


def run(problem: Problem, make_opt: Callable, seed: int, device: torch.device) -> RunResult:
    torch.manual_seed(seed)
    model = problem.make_model()
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(1000 + seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    steps_to_target, step_time, opt_time, n, ema = None, 0.0, 0.0, 0, None
    for xb, yb in problem.batches(gen):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(model(xb), yb, model)
        loss.backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        sync()
        t2 = time.perf_counter()
        step_time, opt_time, n = step_time + t2 - t0, opt_time + t2 - t1, n + 1
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        progress = ema if problem.progress is None else problem.progress(model)
        if steps_to_target is None and progress <= problem.target:
            steps_to_target = n
    final_loss, final_acc = problem.evaluate(model)
    state_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if torch.is_tensor(v))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return RunResult(steps_to_target, final_loss, final_acc, 1e3 * step_time / n, 1e3 * opt_time / n,
                     state_bytes / 2**20, peak)


def ssl_benchmark(quick: bool, seeds, threads: int = 1, out_root: str = "/tmp/visrep-optbench") -> list[dict]:
    """I-JEPA on Fashion-MNIST through the training engine: AdamC vs Adam (weight decay 0 for both,
    so the pair differs only in the memory), same seeds and steps. Reports the mean loss of the last
    10 steps, ms/step and the k-NN accuracy (k=20) of the target encoder's features on a subset."""
    import time

    from visrep.config import load_config
    from visrep.eval import extract_features, knn_classify
    from visrep.runner import load_split, pretrain

    steps = 40 if quick else 300
    rows = []
    for name in ("adamw", "adam_c"):
        for seed in seeds:
            cfg = load_config(Path(__file__).resolve().parents[1] / "visrep/configs/ijepa/fashion_mnist_demo.yaml", [
                f"optim.name={name}", "optim.weight_decay=0", "optim.final_weight_decay=0", "optim.topc=5",
                f"train.max_steps={steps}", f"train.seed={seed}", f"train.threads={threads}", "train.progress=false",
                "train.max_minutes=null", f"train.out_dir={out_root}/{name}-{seed}", "train.ckpt_every=100000"])
            t0 = time.perf_counter()
            method, result = pretrain(cfg)
            ms = (time.perf_counter() - t0) / max(1, len(result.losses)) * 1000
            tr, te = load_split(cfg, "train"), load_split(cfg, "test")
            (xtr, ytr), (xte, yte) = tr.tensors(), te.tensors()
            n_tr, n_te = (5000, 2000) if quick else (20000, 10000)
            ftr, _ = extract_features(method.features, xtr[:n_tr], ytr[:n_tr], progress=False)
            fte, _ = extract_features(method.features, xte[:n_te], yte[:n_te], progress=False)
            knn = knn_classify(ftr, ytr[:n_tr], fte, yte[:n_te], ks=(20,))[20]
            rows.append({"optimizer": "Adam" if name == "adamw" else "AdamC", "seed": seed,
                         "final_loss": statistics.fmean(result.losses[-10:]), "knn20": knn, "ms_per_step": ms})
    print("\n| SSL (I-JEPA, FMNIST) | seed | final loss | k-NN@20 | ms/step |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['seed']} | {r['final_loss']:.4g} | {r['knn20']:.2f} | {r['ms_per_step']:.0f} |")
    base = [r for r in rows if r["optimizer"] == "Adam"]
    crit = [r for r in rows if r["optimizer"] == "AdamC"]
    for key in ("final_loss", "knn20", "ms_per_step"):
        ratio = statistics.fmean(r[key] for r in crit) / statistics.fmean(r[key] for r in base)
        print(f"AdamC / Adam {key}: x{ratio:.3f}")
    return rows


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summarise(results: dict[str, dict[str, list[RunResult]]]) -> tuple[list[dict], list[dict]]:
    """Per (problem, optimizer) means over seeds, and C-variant / base ratios."""
    rows, ratios = [], []
    for problem, by_opt in results.items():
        means = {}
        for name, runs in by_opt.items():
            m = {field: _mean([getattr(r, field) for r in runs]) for field in RunResult.__dataclass_fields__}
            m["reached"] = f"{sum(r.steps_to_target is not None for r in runs)}/{len(runs)}"
            means[name] = m
            rows.append({"problem": problem, "optimizer": name, **m})
        for base in ("SGD", "Adam", "RMSprop"):
            b, c = means[base], means[base + "C"]
            ratio = lambda key, b=b, c=c: None if b[key] in (None, 0) or c[key] is None else c[key] / b[key]
            ratios.append({"problem": problem, "pair": f"{base}C / {base}",
                           "steps_to_target": ratio("steps_to_target"),
                           "final_loss": ratio("final_loss"), "final_acc": ratio("final_acc"),
                           "ms_per_step": ratio("ms_per_step"), "opt_ms_per_step": ratio("opt_ms_per_step"),
                           "state_mb": ratio("state_mb"), "peak_mb": ratio("peak_mb")})
    return rows, ratios


def markdown(rows: list[dict], ratios: list[dict]) -> str:
    def fmt(v, digits=4):
        return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))

    out = ["| problem | optimizer | steps to target (reached) | final loss | final acc | ms/step | opt ms/step "
           "| state MB | peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['problem']} | {r['optimizer']} | {fmt(r['steps_to_target'])} ({r['reached']}) "
                   f"| {fmt(r['final_loss'])} | {fmt(r['final_acc'])} | {fmt(r['ms_per_step'], 3)} "
                   f"| {fmt(r['opt_ms_per_step'], 3)} | {fmt(r['state_mb'], 3)} | {fmt(r['peak_mb'], 4)} |")
    out += ["", "| problem | ratio | steps to target | final loss | final acc | ms/step | opt ms/step | state MB "
            "| peak MB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        out.append(f"| {r['problem']} | {r['pair']} | " + " | ".join(fmt(r[k], 3) for k in (
            "steps_to_target", "final_loss", "final_acc", "ms_per_step", "opt_ms_per_step", "state_mb", "peak_mb"))
            + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small problems, one seed (< 1 min on 1 CPU thread)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 1 quick, 3 otherwise)")
    parser.add_argument("--problems", nargs="+", default=["logreg", "fmnist"], choices=["logreg", "fmnist", "ssl"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data-dir", type=Path, default=FMNIST_DIR)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seeds = range(args.seeds if args.seeds is not None else (1 if args.quick else 3))

    results: dict[str, dict[str, list[RunResult]]] = {}
    settings = {}
    ssl_rows = None
    if "ssl" in args.problems:
        ssl_rows = ssl_benchmark(args.quick, seeds, args.threads)
    for name in [p for p in args.problems if p != "ssl"]:
        if name == "logreg":
            problem = logreg_problem(args.quick, device)
        else:
            problem = fmnist_problem(args.quick, device, args.data_dir)
        settings[name] = {"lrs": problem.lrs, "target": problem.target}
        results[name] = {}
        for opt_name, make_opt in _optimizers(problem.lrs).items():
            results[name][opt_name] = [run(problem, make_opt, seed, device) for seed in seeds]
    rows, ratios = summarise(results)
    print(markdown(rows, ratios))
    if args.out is not None:
        args.out.write_text(json.dumps({
            "settings": {"quick": args.quick, "seeds": len(seeds), "device": str(device), "threads": args.threads,
                         "memory": MEMORY, "problems": settings},
            "runs": {p: {o: [asdict(r) for r in rs] for o, rs in by.items()} for p, by in results.items()},
            "summary": rows, "ratios": ratios, "ssl": ssl_rows}, indent=1))


if __name__ == "__main__":
    main()
