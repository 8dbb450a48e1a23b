"""Linear probe on frozen, pre-extracted features with a learning-rate (and weight-decay) sweep.

Every (lr, wd) configuration is trained at once as ONE batched linear model: the weights of all
configurations are the columns of a single ``[D, G * C]`` matrix, so a minibatch costs one matmul
for the whole sweep. Gradients of the softmax cross-entropy are computed in closed form and the
optimizer (SGD with momentum, or AdamW) is applied per column with that column's lr/wd, so the
configurations are exactly independent runs that share data order and initialisation.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

DEFAULT_LRS = {
    "sgd": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
    "adamw": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
}


@contextlib.contextmanager
def cpu_threads(num_threads: int | None, device: torch.device):
    """Temporarily set torch's intra-op CPU threads (no-op for ``None`` or a non-CPU device).

    The probes' per-step ops are tiny; on a busy machine idle OpenMP worker threads spin and steal
    the CPU from the main thread, which made a 2-thread run 15-40x slower than a 1-thread run here.
    """
    if num_threads is None or device.type != "cpu" or num_threads == torch.get_num_threads():
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def standardize(
    train: Tensor, *others: Tensor, eps: float = 1e-6
) -> tuple[Tensor, ...]:
    """Z-score every tensor with the mean/std of ``train`` (per feature).

    Features whose train std is below ``eps`` (constant on the train set) are only centred, so
    that a rare non-zero value at test time is not blown up by a near-zero divisor.
    """
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True)
    std = torch.where(std > eps, std, torch.ones_like(std))
    return tuple((t - mean) / std for t in (train, *others))


def _split_train_val(n: int, val_fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=generator)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@torch.no_grad()
def _accuracy_per_config(
    x: Tensor, y: Tensor, w: Tensor, b: Tensor, n_cfg: int, n_cls: int, chunk: int = 4096
) -> Tensor:
    """Accuracy (%) of each of the ``n_cfg`` stacked classifiers on ``(x, y)``; non-finite -> nan."""
    correct = torch.zeros(n_cfg, dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], chunk):
        logits = (x[s : s + chunk] @ w + b).view(-1, n_cfg, n_cls)
        correct += (logits.argmax(-1) == y[s : s + chunk, None]).sum(0).double()
    acc = 100.0 * correct / max(1, x.shape[0])
    finite = torch.isfinite(w.view(-1, n_cfg, n_cls)).all(0).all(-1) & torch.isfinite(b.view(n_cfg, n_cls)).all(-1)
    return torch.where(finite, acc, torch.full_like(acc, float("nan"))).cpu()


def _train_stacked(
    x: Tensor,
    y: Tensor,
    lr_col: Tensor,
    wd_col: Tensor,
    n_cfg: int,
    n_cls: int,
    *,
    epochs: int,
    batch_size: int,
    optimizer: str,
    momentum: float,
    betas: tuple[float, float],
    warmup_epochs: float,
    init_std: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Train the stacked model; returns weights [D, G*C], bias [G*C] and last-epoch mean loss [G]."""
    n, d = x.shape
    dev = x.device
    gc = n_cfg * n_cls
    w = (torch.randn(d, n_cls, generator=generator) * init_std).repeat(1, n_cfg).to(dev)
    b = torch.zeros(gc, device=dev)
    state_w = [torch.zeros_like(w) for _ in range(1 if optimizer == "sgd" else 2)]
    state_b = [torch.zeros_like(b) for _ in range(1 if optimizer == "sgd" else 2)]
    b1, b2 = betas
    use_wd = bool((wd_col != 0).any())
    neg_ones = torch.full((batch_size, n_cfg, 1), -1.0, device=dev)
    loss_sum = torch.zeros(n_cfg, dtype=torch.float64, device=dev)

    def update(xb: Tensor, yb: Tensor, lr_t: Tensor, t: int, track_loss: bool) -> None:
        bs = xb.shape[0]
        logp = torch.log_softmax((xb @ w + b).view(bs, n_cfg, n_cls), dim=-1)
        y_idx = yb.view(bs, 1, 1).expand(bs, n_cfg, 1)
        if track_loss:
            loss_sum.sub_(logp.gather(2, y_idx).sum((0, 2)).double())
        grad = logp.exp_().scatter_add_(2, y_idx, neg_ones[:bs])  # softmax - onehot
        grad = grad.view(bs, gc).div_(bs)  # d(mean CE) / d(logits)
        if optimizer == "sgd":  # torch.optim.SGD semantics: coupled L2, momentum buffer, no dampening
            buf_w, buf_b = state_w[0], state_b[0]
            buf_w.addmm_(xb.T, grad, beta=momentum)  # buf = momentum * buf + x^T grad
            if use_wd:
                buf_w.addcmul_(w, wd_col)
            buf_b.mul_(momentum).add_(grad.sum(0))
            w.addcmul_(buf_w, lr_t, value=-1.0)
            b.addcmul_(buf_b, lr_t, value=-1.0)
        else:  # torch.optim.AdamW semantics: decoupled decay on the weights (none on the bias)
            if use_wd:
                w.mul_(1.0 - lr_t * wd_col)
            for p, g, (m, v) in ((w, xb.T @ grad, state_w), (b, grad.sum(0), state_b)):
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v / (1 - b2**t)).sqrt_().add_(1e-8)
                p.sub_(m.div(denom).mul_(lr_t / (1 - b1**t)))

    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    warmup = int(round(warmup_epochs * steps_per_epoch))
    # Shuffled rows are gathered a block of minibatches at a time (~64 MiB): much cheaper than one
    # gather per minibatch, and memory stays bounded for large feature sets.
    block = max(1, (1 << 24) // max(1, d * batch_size)) * batch_size
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=generator).to(dev)
        last_epoch = epoch == epochs - 1
        for s0 in range(0, n, block):
            idx = perm[s0 : s0 + block]
            x_blk, y_blk = x[idx], y[idx]
            for s in range(0, x_blk.shape[0], batch_size):
                if step < warmup:
                    sched = (step + 1) / warmup
                else:
                    sched = 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
                update(x_blk[s : s + batch_size], y_blk[s : s + batch_size], lr_col * sched, step + 1, last_epoch)
                step += 1
    return w, b, (loss_sum / max(1, n)).float().cpu()


def linear_probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    lrs: Sequence[float] | None = None,
    wds: Iterable[float] = (0.0,),
    epochs: int = 10,
    batch_size: int = 256,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    warmup_epochs: float = 0.0,
    val_fraction: float = 0.1,
    refit: bool = False,
    init_std: float = 0.01,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    num_threads: int | None = 1,
    inputs: Mapping[str, Tensor] | None = None,
) -> dict:
    """Linear probe with a one-pass sweep over ``lrs`` x ``wds``; returns a results dict.

    Protocol: carve a seeded random ``val_fraction`` of the training set out as a validation split;
    standardise features with the mean/std of the remaining (fit) split; train every (lr, wd)
    configuration for ``epochs`` epochs of minibatch ``optimizer`` ("sgd": momentum SGD with coupled
    L2; "adamw": decoupled decay) under a cosine schedule (optional linear warmup), all batched in
    one model sharing the data order and the (seeded, N(0, ``init_std``^2)) initialisation; select
    the configuration with the best validation accuracy (ties: the first in sweep order) and report
    its test accuracy. Diverged configurations (non-finite weights) are never selected.

    With ``refit=True`` the selected configuration is retrained on the full training set
    (standardised with its own statistics) and that model's test accuracy is reported instead.
    ``val_fraction=0`` skips validation and selects on the fit-set accuracy (not recommended).
    On CPU the probe runs with ``num_threads`` torch threads (default 1, see ``cpu_threads``; None
    keeps the current setting); 60k x 192 features, 10 classes, 7 lrs, 10 epochs take ~2.5 s.

    ``inputs`` (``{name: column indices}``, e.g. DINOv2's ``linear_input_columns``) sweeps the probe's
    input as well: each named set of columns is probed as above (the same validation split, data order
    and seed) and the input whose best configuration has the best validation accuracy is kept (ties:
    the first in ``inputs`` order), as DINOv2's ``eval/linear.py`` keeps the best of its classifiers
    over (blocks, avgpool, lr). The result then also has ``best["input"]`` and one ``table`` row per
    (input, lr, wd), each with its ``input``.

    Returns ``{"test_acc", "best": {lr, wd, val_acc, test_acc}, "table": [{lr, wd, val_acc,
    test_acc, train_loss, diverged}, ...], "n_fit", "n_val", "n_test", "epochs", "optimizer",
    "time_s"}`` with accuracies in %. ``table[*]["test_acc"]`` is reported for diagnosis only.
    """
    device = torch.device(device) if device is not None else train_feats.device
    kw = dict(lrs=lrs, wds=wds, epochs=epochs, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
              betas=betas, warmup_epochs=warmup_epochs, val_fraction=val_fraction, refit=refit, init_std=init_std,
              num_classes=num_classes, seed=seed, device=device)
    with cpu_threads(num_threads, device):
        if inputs is None:
            return _linear_probe(train_feats, train_labels, test_feats, test_labels, **kw)
        return _probe_each_input(train_feats, train_labels, test_feats, test_labels, inputs, kw)


def _probe_each_input(train_feats, train_labels, test_feats, test_labels, inputs: Mapping[str, Tensor],
                      kw: dict) -> dict:
    if not inputs:
        raise ValueError("inputs must name at least one set of columns")
    t0 = time.perf_counter()
    runs, errors = {}, []
    for name, cols in inputs.items():
        cols = torch.as_tensor(cols, dtype=torch.long)
        if cols.numel() == 0 or int(cols.min()) < 0 or int(cols.max()) >= train_feats.shape[1]:
            raise ValueError(f"input {name!r}: its columns must lie in 0..{train_feats.shape[1] - 1}")
        try:
            runs[name] = _linear_probe(train_feats[:, cols], train_labels, test_feats[:, cols], test_labels, **kw)
        except FloatingPointError as e:  # every configuration of this input diverged: the others may not
            errors.append(f"{name}: {e}")
    if not runs:
        raise FloatingPointError("every linear-probe input diverged: " + "; ".join(errors))
    name = max(runs, key=lambda k: runs[k]["best"]["val_acc"])  # max() keeps the first of equal values
    out = dict(runs[name])
    out["best"] = {"input": name, **out["best"]}
    out["table"] = [{"input": k, **row} for k, r in runs.items() for row in r["table"]]
    out["inputs"] = {k: r["best"]["val_acc"] for k, r in runs.items()}
    out["time_s"] = time.perf_counter() - t0
    return out


def _linear_probe(train_feats, train_labels, test_feats, test_labels, *, lrs, wds, epochs, batch_size, optimizer,
                  momentum, betas, warmup_epochs, val_fraction, refit, init_std, num_classes, seed, device) -> dict:
    t0 = time.perf_counter()
    optimizer = optimizer.lower()
    if optimizer not in DEFAULT_LRS:
        raise ValueError(f"optimizer must be one of {sorted(DEFAULT_LRS)}, got {optimizer!r}")
    lrs = tuple(float(v) for v in (DEFAULT_LRS[optimizer] if lrs is None else lrs))
    wds = tuple(float(v) for v in wds)
    if not lrs or not wds:
        raise ValueError("lrs and wds must be non-empty")
    x_all = train_feats.to(device, torch.float32)
    y_all = train_labels.to(device, torch.int64)
    x_test = test_feats.to(device, torch.float32)
    y_test = test_labels.to(device, torch.int64)
    if num_classes is None:
        num_classes = int(max(y_all.max().item(), y_test.max().item())) + 1
    n_cls = num_classes

    configs = [(lr, wd) for wd in wds for lr in lrs]
    n_cfg = len(configs)
    lr_col = torch.tensor([lr for lr, _ in configs], device=device).repeat_interleave(n_cls)
    wd_col = torch.tensor([wd for _, wd in configs], device=device).repeat_interleave(n_cls)

    gen = torch.Generator().manual_seed(seed)
    fit_idx, val_idx = _split_train_val(x_all.shape[0], val_fraction, gen)
    fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
    x_fit, x_val, x_te = standardize(x_all[fit_idx], x_all[val_idx], x_test)
    y_fit, y_val = y_all[fit_idx], y_all[val_idx]

    train_kw = dict(
        epochs=epochs, batch_size=batch_size, optimizer=optimizer, momentum=momentum, betas=betas,
        warmup_epochs=warmup_epochs, init_std=init_std,
    )
    w, b, losses = _train_stacked(x_fit, y_fit, lr_col, wd_col, n_cfg, n_cls, generator=gen, **train_kw)
    if len(val_idx) > 0:
        val_acc = _accuracy_per_config(x_val, y_val, w, b, n_cfg, n_cls)
    else:
        val_acc = _accuracy_per_config(x_fit, y_fit, w, b, n_cfg, n_cls)
    test_acc = _accuracy_per_config(x_te, y_test, w, b, n_cfg, n_cls)

    table = []
    for i, (lr, wd) in enumerate(configs):
        diverged = bool(torch.isnan(val_acc[i]))
        table.append(dict(
            lr=lr, wd=wd,
            val_acc=None if diverged else float(val_acc[i]),
            test_acc=None if diverged else float(test_acc[i]),
            train_loss=float(losses[i]), diverged=diverged,
        ))
    if all(row["diverged"] for row in table):
        raise FloatingPointError("every linear-probe configuration diverged; lower the learning rates")
    sel = torch.nan_to_num(val_acc, nan=-1.0)
    best_i = int(torch.nonzero(sel == sel.max())[0])  # first maximum in sweep order
    best = dict(table[best_i])
    best.pop("train_loss")
    best.pop("diverged")
    result_test = best["test_acc"]

    if refit:
        x_full, x_te_full = standardize(x_all, x_test)
        lr, wd = configs[best_i]
        one = torch.tensor([lr], device=device).repeat_interleave(n_cls)
        one_wd = torch.tensor([wd], device=device).repeat_interleave(n_cls)
        gen_refit = torch.Generator().manual_seed(seed + 1)
        w1, b1, _ = _train_stacked(x_full, y_all, one, one_wd, 1, n_cls, generator=gen_refit, **train_kw)
        refit_acc = float(_accuracy_per_config(x_te_full, y_test, w1, b1, 1, n_cls)[0])
        best["refit_test_acc"] = refit_acc
        result_test = refit_acc

    return dict(
        test_acc=result_test, best=best, table=table,
        n_fit=int(len(fit_idx)), n_val=int(len(val_idx)), n_test=int(x_test.shape[0]),
        epochs=epochs, optimizer=optimizer, refit=refit, time_s=time.perf_counter() - t0,
    )
