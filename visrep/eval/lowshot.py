"""Low-shot evaluation: multinomial logistic regression on frozen features.

Default ``variant="logistic_eval"``: MSN's ``logistic_eval.py``: each row centred on its own mean and
L2-normalised (``cyanure.preprocess(centering=True, normalize=True, columns=False)``), no
intercept, lambda = 2.5e-4 / N (N training images), fitted by cyanure (tol 1e-3, 300 epochs) when
it is installed (``pip install visrep[lowshot]``), else by full-batch L-BFGS to the same optimum.
``variant="visrep"`` (labelled "low-shot (visrep)"): columns centred on the train mean, rows
normalised, a bias, l2 = 1e-4 (or cross-validated). Splits: 1, 2, 5 images per class and 1%,
3 seeded splits. Details: docs/eval/lowshot.md; parity: tests/parity/test_eval_protocols.py.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import cpu_threads

DEFAULT_SETTINGS: tuple = (1, 2, 5, "1%")
DEFAULT_L2 = 1e-4
DEFAULT_L2_GRID: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MSN_LAMBDA = 2.5e-4          # logistic_eval.py --lambd; the fit uses MSN_LAMBDA / N
MSN_TOL, MSN_MAX_EPOCHS, MSN_IT0 = 1e-3, 300, 10   # its cyanure fit(tol, max_epochs, it0)
VARIANTS = ("logistic_eval", "visrep")
SOLVERS = ("auto", "cyanure", "lbfgs")


def have_cyanure() -> bool:
    try:
        import cyanure.estimators  # noqa: F401
    except ImportError:
        return False
    return True


def preprocess_features(train: Tensor, *others: Tensor, mode: str = "l2", eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Feature preprocessing shared by all splits; statistics come from ``train`` (labels unused).

    ``"rows"``: every row centred on its own mean, then L2-normalised (MSN's ``cyanure.preprocess(
    centering=True, normalize=True, columns=False)``; no statistic shared between rows).
    ``"l2"``: centre with the train (column) mean, then L2-normalise every row.
    ``"standardize"``: z-score each feature with the train mean/std (constant features only centred).
    ``"none"``: features as given.
    """
    tensors = (train, *others)
    if mode == "none":
        return tensors
    if mode == "rows":
        return tuple(F.normalize(t - t.mean(1, keepdim=True), dim=1) for t in tensors)
    mean = train.mean(0, keepdim=True)
    if mode == "l2":
        return tuple(F.normalize(t - mean, dim=1) for t in tensors)
    if mode == "standardize":
        std = train.std(0, keepdim=True)
        std = torch.where(std > eps, std, torch.ones_like(std))
        return tuple((t - mean) / std for t in tensors)
    raise ValueError(f"preprocess must be 'rows', 'l2', 'standardize' or 'none', got {mode!r}")


def fit_logreg(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 500,
    bias: bool = True,
    tol: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """Minimise ``mean_i CE(x_i W + b, y_i) + l2 / 2 * ||W||_F^2`` (bias unpenalised) by L-BFGS.

    Full batch, strong-Wolfe line search, zero init (the problem is strictly convex for l2 > 0,
    so the result does not depend on the init). Computed in ``x``'s dtype; returns ``(W [D, C], b [C])``.
    """
    d = x.shape[1]
    w = torch.zeros(d, num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=bias)
    params = [w, b] if bias else [w]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25) + 1, history_size=20,
        tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fit_logreg_cyanure(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    lambd: float,
    *,
    tol: float = MSN_TOL,
    max_iter: int = MSN_MAX_EPOCHS,
    duality_gap_interval: int = MSN_IT0,
    seed: int = 0,
    n_threads: int = 1,
) -> Tensor:
    """MSN's classifier: cyanure's multiclass logistic regression, l2 penalty, no intercept, i.e.
    ``min_W mean_i CE(x_i W, y_i) + lambd / 2 ||W||_F^2`` to a relative duality gap ``tol``
    (``logistic_eval.py``: ``MultiClassifier(loss='multiclass-logistic', penalty='l2',
    fit_intercept=False).fit(it0=10, lambd, tol=1e-3, solver='auto', seed=0, max_epochs=300)``,
    cyanure >= 1.0 spelling). Returns ``W [D, num_classes]`` in ``x``'s dtype and device; classes
    absent from ``y`` get a zero column."""
    import numpy as np
    from cyanure.estimators import Classifier

    xs = np.ascontiguousarray(x.detach().cpu().double().numpy())
    ys = y.detach().cpu().numpy()
    clf = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False, lambda_1=float(lambd),
                     tol=float(tol), solver="auto", max_iter=int(max_iter),
                     duality_gap_interval=int(duality_gap_interval), random_state=int(seed), verbose=False,
                     n_threads=int(n_threads))
    clf.fit(xs, ys)
    coef = torch.from_numpy(np.asarray(clf.coef_, dtype=np.float64))
    classes = [int(c) for c in np.asarray(clf.classes_).reshape(-1)]
    if coef.ndim == 1 or coef.shape[1] == 1:  # cyanure's binary problem: one score column for classes[1]
        coef = torch.cat([torch.zeros_like(coef.reshape(-1, 1)), coef.reshape(-1, 1)], 1)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64)
    w[:, classes] = coef
    return w.to(x.device, x.dtype)


@torch.no_grad()
def _accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor, chunk: int = 8192) -> float:
    correct = 0
    for s in range(0, x.shape[0], chunk):
        correct += int(((x[s : s + chunk] @ w + b).argmax(1) == y[s : s + chunk]).sum())
    return 100.0 * correct / max(1, x.shape[0])


def _setting_name(setting) -> str:
    return f"{setting}/class" if isinstance(setting, int) else str(setting)


def lowshot_splits(
    labels: Tensor, setting: int | str, n_splits: int = 3, seed: int = 0, num_classes: int | None = None
) -> list[Tensor]:
    """Seeded, class-balanced index sets into ``labels`` for one low-shot setting.

    ``setting`` is an int (that many images per class) or a string like ``"1%"`` (that fraction of
    every class, rounded, at least one image: a stratified sample). Split ``i`` draws one random
    order per class from a generator seeded with ``seed + i``, and every setting takes a prefix of
    that order, so for a given split the sets are nested (1/class in 2/class in 5/class in 1%).
    """
    labels = labels.cpu()
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if isinstance(setting, str):
        if not setting.endswith("%"):
            raise ValueError(f"setting must be an int or a percentage string like '1%', got {setting!r}")
        frac = float(setting[:-1]) / 100.0
    else:
        frac = None
    by_class = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    splits = []
    for i in range(n_splits):
        gen = torch.Generator().manual_seed(seed + i)
        chosen = []
        for members in by_class:
            if members.numel() == 0:
                continue
            order = members[torch.randperm(members.numel(), generator=gen)]
            k = max(1, int(round(frac * members.numel()))) if frac is not None else int(setting)
            if k > members.numel():
                raise ValueError(f"{k} images per class requested but a class has only {members.numel()}")
            chosen.append(order[:k])
        splits.append(torch.cat(chosen).sort().values)
    return splits


def _cv_folds(y: Tensor, n_folds: int, gen: torch.Generator) -> list[Tensor]:
    """Stratified fold ids: each class's samples dealt round-robin over folds in random order."""
    fold = torch.empty_like(y)
    for c in y.unique():
        members = torch.nonzero(y == c).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        fold[members] = torch.arange(members.numel()) % n_folds
    return [torch.nonzero(fold == f).flatten() for f in range(n_folds)]


def select_l2_by_cv(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    *,
    max_folds: int = 5,
    seed: int = 0,
    max_iter: int = 500,
) -> tuple[float | None, dict[float, float]]:
    """Pick the L2 strength by stratified k-fold cross-validation on the low-shot training set only.

    Folds = min(``max_folds``, smallest class count), so with k images per class every fold holds
    out one image per class. Returns ``(best_l2, {l2: mean CV accuracy})``, or ``(None, {})`` when
    some class has a single image (no fold could hold it out). Ties go to the LARGER l2.
    """
    counts = torch.bincount(y.cpu(), minlength=num_classes)
    counts = counts[counts > 0]
    n_folds = int(min(max_folds, int(counts.min())))
    if n_folds < 2:
        return None, {}
    folds = _cv_folds(y.cpu(), n_folds, torch.Generator().manual_seed(seed))
    all_idx = torch.arange(y.shape[0])
    scores: dict[float, float] = {}
    for l2 in grid:
        accs = []
        for held in folds:
            mask = torch.ones(y.shape[0], dtype=torch.bool)
            mask[held] = False
            tr = all_idx[mask].to(x.device)
            held = held.to(x.device)
            w, b = fit_logreg(x[tr], y[tr], num_classes, l2, max_iter=max_iter)
            accs.append(_accuracy(x[held], y[held], w, b))
        scores[float(l2)] = sum(accs) / len(accs)
    best_score = max(scores.values())
    best = max(l2 for l2, s in scores.items() if s >= best_score - 1e-9)
    return best, scores


def lowshot_logreg(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    settings: Sequence[int | str] = DEFAULT_SETTINGS,
    n_splits: int = 3,
    seed: int = 0,
    l2: float | str = DEFAULT_L2,
    l2_grid: Sequence[float] = DEFAULT_L2_GRID,
    default_l2: float = DEFAULT_L2,
    preprocess: str | None = None,
    max_iter: int = 500,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    num_threads: int | None = 1,
    variant: str = "logistic_eval",
    solver: str = "auto",
    msn_lambda: float = MSN_LAMBDA,
) -> dict:
    """Low-shot multinomial logistic regression; mean/std test accuracy (%) over seeded splits.

    ``variant="logistic_eval"`` (default): MSN's ``logistic_eval.py`` on each split: rows centred and
    normalised (``preprocess="rows"``), no intercept, ``lambd = msn_lambda / n_train``, fitted by
    cyanure (``solver="cyanure"``; ``"auto"``: cyanure when installed, else ``"lbfgs"``:
    :func:`fit_logreg` without bias to a tight tolerance, the same optimum; the tolerance-matched
    comparison is in tests/parity/test_eval_protocols.py). ``l2``, ``l2_grid`` and ``default_l2``
    are for the other variant. ``variant="visrep"``: the description below.

    For each setting in ``settings`` (int: images per class; ``"1%"``: a stratified 1% of the
    training labels) and each of ``n_splits`` class-balanced splits (``lowshot_splits``, seeds
    ``seed .. seed + n_splits - 1``), fit ``fit_logreg`` on the selected training images and score
    the full test set. Features are first preprocessed with ``preprocess_features(mode=preprocess)``
    using statistics of all of ``train_feats`` (label-free, as the unlabelled images are available in
    the semi-supervised setting); default ``"l2"``: centre, then L2-normalise each row.

    L2 strength: the objective is ``mean CE + l2_eff / 2 ||W||^2`` with ``l2_eff = l2 * E||x||^2``
    (mean squared row norm of the preprocessed training features), i.e. ``l2`` is relative to the
    feature scale, so one value means the same for raw pixels, standardised or unit-norm features
    (for this variant's default ``"l2"`` preprocessing ``l2_eff = l2``). Default: fixed ``l2 = 1e-4``
    (``DEFAULT_L2``). On Fashion-MNIST raw pixels accuracy is flat within ~0.5 points for
    ``l2`` in [3e-5, 3e-4] at 1/2/5 images per class and 1%, and cross-validation picked values in
    that range while costing ~15x the fixed-l2 run, hence a fixed default. ``l2="cv"`` instead picks
    it per split from ``l2_grid`` by stratified cross-validation on the low-shot training set only
    (``select_l2_by_cv``: one image per class held out per fold for k-shot, 5 folds for 1%), never on
    the test set; with 1 image per class CV is impossible and ``default_l2`` is used.

    Runs in float64 on the CPU by default (float32 on CUDA), with ``num_threads`` torch threads on
    CPU (default 1: the small L-BFGS problems do not gain from threads, and idle OpenMP threads slow
    a busy machine down badly; None keeps the current setting, e.g. for 1000 classes).

    Returns ``{"settings": {name: {"mean", "std", "accs", "l2", "n_train"[, "cv"]}}, "preprocess",
    "variant", "solver", "time_s"}`` (accuracies in %; for ``"logistic_eval"``, ``l2`` holds the lambda of
    each fit); ``std`` is the sample std over splits (ddof=1).
    """
    t0 = time.perf_counter()
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if variant == "logistic_eval":
        solver = ("cyanure" if have_cyanure() else "lbfgs") if solver == "auto" else solver
        if solver == "cyanure" and not have_cyanure():
            raise ImportError("solver='cyanure' needs cyanure (pip install 'visrep[lowshot]')")
        preprocess = preprocess or "rows"
    else:
        solver, preprocess = "lbfgs", preprocess or "l2"
    device = torch.device(device) if device is not None else train_feats.device
    with cpu_threads(num_threads, device):
        out = _lowshot(train_feats, train_labels, test_feats, test_labels, settings=settings, n_splits=n_splits,
                       seed=seed, l2=l2, l2_grid=l2_grid, default_l2=default_l2, preprocess=preprocess,
                       max_iter=max_iter, num_classes=num_classes, device=device, dtype=dtype, variant=variant,
                       solver=solver, msn_lambda=msn_lambda, n_threads=num_threads or 1)
    return dict(settings=out, preprocess=preprocess, variant=variant, solver=solver, time_s=time.perf_counter() - t0)


def fit_logistic_eval(x: Tensor, y: Tensor, num_classes: int, lambd: float, solver: str, n_threads: int = 1) -> Tensor:
    """``W`` of MSN's problem (no intercept, penalty ``lambd / 2 ||W||^2``) with ``solver``
    ``"cyanure"`` (the official fit) or ``"lbfgs"`` (the exact optimum, to ~1e-10)."""
    if solver == "cyanure":
        return fit_logreg_cyanure(x, y, num_classes, lambd, n_threads=n_threads)
    w, _ = fit_logreg(x.double(), y, num_classes, lambd, bias=False, max_iter=5000, tol=1e-10)
    return w.to(x.dtype)


def _lowshot(train_feats, train_labels, test_feats, test_labels, *, settings, n_splits, seed, l2, l2_grid,
             default_l2, preprocess, max_iter, num_classes, device, dtype, variant="visrep", solver="lbfgs",
             msn_lambda=MSN_LAMBDA, n_threads=1) -> dict:
    if dtype is None:
        dtype = torch.float32 if device.type == "cuda" else torch.float64
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    if isinstance(l2, str) and l2 != "cv":
        raise ValueError(f"l2 must be a float or 'cv', got {l2!r}")
    x_tr, x_te = preprocess_features(
        train_feats.to(device, dtype), test_feats.to(device, dtype), mode=preprocess
    )
    y_tr = train_labels.to(device, torch.int64)
    y_te = test_labels.to(device, torch.int64)
    # l2 is relative to the feature scale: scaling x by s scales the optimal W by 1/s, so the same
    # problem needs a penalty scaled by s^2; use E||x||^2 (= 1 for the default unit-norm rows).
    l2_scale = max(float((x_tr * x_tr).sum(1).mean()), 1e-12)

    out: dict = {}
    for setting in settings:
        accs, l2s, cv_tables, n_train = [], [], [], 0
        for i, idx in enumerate(lowshot_splits(train_labels, setting, n_splits, seed, num_classes)):
            idx = idx.to(device)
            xs, ys = x_tr[idx], y_tr[idx]
            n_train = int(idx.numel())
            if variant == "logistic_eval":
                lambd = msn_lambda / n_train       # logistic_eval.py: lambd /= len(embs)
                w = fit_logistic_eval(xs, ys, num_classes, lambd, solver, n_threads)
                accs.append(_accuracy(x_te, y_te, w, torch.zeros(num_classes, dtype=w.dtype, device=w.device)))
                l2s.append(lambd)
                continue
            if l2 == "cv":
                grid = [g * l2_scale for g in l2_grid]
                chosen, table = select_l2_by_cv(xs, ys, num_classes, grid, seed=seed + i, max_iter=max_iter)
                chosen = default_l2 if chosen is None else l2_grid[grid.index(chosen)]
                cv_tables.append({g: table[g * l2_scale] for g in l2_grid} if table else {})
            else:
                chosen = float(l2)
            w, b = fit_logreg(xs, ys, num_classes, chosen * l2_scale, max_iter=max_iter)
            accs.append(_accuracy(x_te, y_te, w, b))
            l2s.append(chosen)
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        entry = dict(mean=mean, std=std, accs=accs, l2=l2s, n_train=n_train)
        if cv_tables and any(cv_tables):
            entry["cv"] = [{str(k): v for k, v in t.items()} for t in cv_tables]
        out[_setting_name(setting)] = entry
    return out
