"""Fast tests of the frozen-feature evaluation protocols on synthetic data."""
from __future__ import annotations

import inspect
import json
import math
import os

import pytest
import torch
from torch import nn

from visrep.eval import (
    extract_features,
    extract_train_test,
    fit_logreg,
    format_markdown,
    knn_classify,
    linear_probe,
    lowshot_logreg,
    lowshot_splits,
    run_protocols,
    select_l2_by_cv,
    write_results,
)


def clusters(n_train_per_class=60, n_test_per_class=40, dim=16, n_cls=5, sep=8.0, seed=0, shuffle_labels=False):
    """Gaussian clusters (unit noise) with means ``sep`` apart on random directions."""
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(n_cls, dim, generator=g), dim=1) * sep
    means += 3.0  # a common offset, so that centring matters

    def draw(n_per):
        y = torch.arange(n_cls).repeat_interleave(n_per)
        x = means[y] + torch.randn(y.shape[0], dim, generator=g)
        return x, y

    xtr, ytr = draw(n_train_per_class)
    xte, yte = draw(n_test_per_class)
    if shuffle_labels:
        ytr = ytr[torch.randperm(ytr.shape[0], generator=g)]
        yte = yte[torch.randperm(yte.shape[0], generator=g)]
    return xtr, ytr, xte, yte


def random_features(n_train=400, n_test=400, dim=16, n_cls=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_train, dim, generator=g), torch.randint(0, n_cls, (n_train,), generator=g),
            torch.randn(n_test, dim, generator=g), torch.randint(0, n_cls, (n_test,), generator=g))


CHANCE_MAX = 20.0 + 3 * 100 * math.sqrt(0.2 * 0.8 / 200)  # 5 classes, 200 test points, 3 sigma


# ---------------------------------------------------------------------------------------- k-NN
@pytest.mark.parametrize("weighting,metric", [("exp", "cosine"), ("uniform", "cosine"), ("uniform", "euclidean"),
                                              ("exp", "euclidean")])
def test_knn_separable(weighting, metric):
    acc = knn_classify(*clusters(), ks=(1, 5, 10), weighting=weighting, metric=metric)
    assert set(acc) == {1, 5, 10}
    assert all(a >= 99.0 for a in acc.values()), acc


def test_knn_random_labels_near_chance():
    acc = knn_classify(*random_features(), ks=(10, 20))
    assert all(a < CHANCE_MAX for a in acc.values()), acc


def _knn_reference(xtr, ytr, xte, k, T, n_cls, weighting):
    xtr = torch.nn.functional.normalize(xtr, dim=1)
    xte = torch.nn.functional.normalize(xte, dim=1)
    preds = []
    for q in xte:
        sims = xtr @ q
        order = sorted(range(len(sims)), key=lambda i: -float(sims[i]))[:k]
        votes = [0.0] * n_cls
        for i in order:
            votes[int(ytr[i])] += math.exp(float(sims[i]) / T) if weighting == "exp" else 1.0
        preds.append(max(range(n_cls), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize("weighting", ["exp", "uniform"])
def test_knn_matches_reference_and_chunking(weighting):
    xtr, ytr, xte, yte = clusters(n_train_per_class=15, n_test_per_class=8, sep=1.5, seed=3)
    for k in (3, 7):
        ref = _knn_reference(xtr, ytr, xte, k, 0.07, 5, weighting)
        ref_acc = 100.0 * float((ref == yte).float().mean())
        for chunk in (None, 1, 7):
            acc = knn_classify(xtr, ytr, xte, yte, ks=k, weighting=weighting, chunk_size=chunk)
            assert acc[k] == pytest.approx(ref_acc)


def test_knn_rejects_bad_args():
    xtr, ytr, xte, yte = clusters(n_train_per_class=2)
    with pytest.raises(ValueError):
        knn_classify(xtr, ytr, xte, yte, ks=11)
    with pytest.raises(ValueError):
        knn_classify(xtr, ytr, xte, yte, ks=3, weighting="distance")


# ------------------------------------------------------------------------------- linear probe
def test_linear_separable():
    res = linear_probe(*clusters(), epochs=5, batch_size=64)
    assert res["test_acc"] >= 99.0
    assert len(res["table"]) == 7  # the default SGD lr sweep
    assert res["n_fit"] + res["n_val"] == 300 and res["n_val"] == 30


def test_linear_random_labels_near_chance():
    res = linear_probe(*random_features(), epochs=5, batch_size=64)
    assert res["test_acc"] < CHANCE_MAX


def test_linear_picks_sensible_lr():
    # a tiny lr leaves the random init (chance); a sensible lr learns the task
    res = linear_probe(*clusters(sep=4.0), lrs=(1e-7, 0.1), epochs=5, batch_size=64, init_std=1.0)
    assert res["best"]["lr"] == 0.1
    by_lr = {row["lr"]: row for row in res["table"]}
    assert by_lr[0.1]["val_acc"] > by_lr[1e-7]["val_acc"] + 30
    assert by_lr[1e-7]["train_loss"] > by_lr[0.1]["train_loss"]


def test_linear_diverged_config_never_selected():
    res = linear_probe(*clusters(), lrs=(1e38, 0.1), epochs=3)
    assert [row["diverged"] for row in res["table"]] == [True, False]
    assert res["best"]["lr"] == 0.1 and res["test_acc"] >= 99.0


def test_linear_configs_are_independent_runs():
    """A config's result does not depend on which other configs share the batched model."""
    data = clusters(sep=2.0)
    both = linear_probe(*data, lrs=(0.01, 0.3), wds=(0.0, 1e-3), epochs=3, batch_size=32)
    single = linear_probe(*data, lrs=(0.3,), wds=(1e-3,), epochs=3, batch_size=32)
    row = next(r for r in both["table"] if r["lr"] == 0.3 and r["wd"] == 1e-3)
    assert len(both["table"]) == 4
    assert row["val_acc"] == pytest.approx(single["table"][0]["val_acc"])
    assert row["train_loss"] == pytest.approx(single["table"][0]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_linear_matches_torch_optim(optimizer):
    """The closed-form batched update equals nn.Linear + torch.optim.SGD / AdamW on one config."""
    xtr, ytr, xte, yte = clusters(n_train_per_class=8, n_test_per_class=2, dim=6, n_cls=3, sep=2.0)
    # val_fraction=0 and one epoch of full-batch steps: deterministic order, easy to replicate
    from visrep.eval.linear import _train_stacked, standardize

    x, = standardize(xtr)
    lr, wd, mom, steps = (0.5 if optimizer == "sgd" else 0.05), 1e-2, 0.9, 4
    gen = torch.Generator().manual_seed(0)
    w, b, _ = _train_stacked(x, ytr, torch.full((3,), lr), torch.full((3,), wd), 1, 3, epochs=steps,
                             batch_size=x.shape[0], optimizer=optimizer, momentum=mom, betas=(0.9, 0.999),
                             warmup_epochs=0, init_std=0.1, generator=gen)
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 3)
    with torch.no_grad():
        lin.weight.copy_((torch.randn(6, 3, generator=gen) * 0.1).T)
        lin.bias.zero_()
    groups = [{"params": [lin.weight], "weight_decay": wd}, {"params": [lin.bias], "weight_decay": 0.0}]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=mom)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(lin(x), ytr).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(w, lin.weight.detach().T, atol=1e-5, rtol=1e-4)
    # the bias is not decayed
    torch.testing.assert_close(b, lin.bias.detach(), atol=1e-5, rtol=1e-4)


def test_linear_adamw_and_refit():
    res = linear_probe(*clusters(), optimizer="adamw", epochs=3, batch_size=64, refit=True)
    assert res["test_acc"] >= 99.0
    assert "refit_test_acc" in res["best"]
    assert len(res["table"]) == 6


def test_thread_setting_restored():
    torch.set_num_threads(2)
    try:
        linear_probe(*clusters(n_train_per_class=10), epochs=1, num_threads=1)
        lowshot_logreg(*clusters(n_train_per_class=10), settings=(1,), n_splits=1, num_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_linear_deterministic():
    data = clusters(sep=2.0)
    a = linear_probe(*data, epochs=2, seed=5)
    b = linear_probe(*data, epochs=2, seed=5)
    assert a["table"] == b["table"] and a["best"] == b["best"]


# ----------------------------------------------------------------------------------- low-shot
def test_lowshot_splits_balanced_nested_deterministic():
    y = torch.arange(4).repeat_interleave(250)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    one = lowshot_splits(y, 1, n_splits=3, seed=0)
    five = lowshot_splits(y, 5, n_splits=3, seed=0)
    pct = lowshot_splits(y, "1%", n_splits=3, seed=0)
    assert len(one) == len(five) == len(pct) == 3
    for s1, s5, sp in zip(one, five, pct):
        assert torch.bincount(y[s1], minlength=4).tolist() == [1] * 4
        assert torch.bincount(y[s5], minlength=4).tolist() == [5] * 4
        assert torch.bincount(y[sp], minlength=4).tolist() == [2] * 4  # round(1% of 250) = 2 (stratified)
        assert set(s1.tolist()) <= set(s5.tolist())
    assert not torch.equal(one[0], one[1])  # different seeds, different splits
    again = lowshot_splits(y, 5, n_splits=3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(five, again))


def test_fit_logreg_reaches_optimum():
    xtr, ytr, _, _ = clusters(n_train_per_class=10, sep=2.0)
    x = xtr.double()
    l2 = 1e-2
    w, b = fit_logreg(x, ytr, 5, l2)
    w.requires_grad_(True)
    b.requires_grad_(True)
    loss = nn.functional.cross_entropy(x @ w + b, ytr) + 0.5 * l2 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert gw.abs().max() < 1e-5 and gb.abs().max() < 1e-5


@pytest.mark.parametrize("variant,preprocess", [("logistic_eval", None), ("visrep", "l2"), ("visrep", "standardize"),
                                                ("visrep", "none")])
def test_lowshot_separable(variant, preprocess):
    res = lowshot_logreg(*clusters(n_train_per_class=200), preprocess=preprocess, variant=variant)
    assert res["variant"] == variant and res["preprocess"] == (preprocess or "rows")
    assert list(res["settings"]) == ["1/class", "2/class", "5/class", "1%"]
    for name, r in res["settings"].items():
        assert len(r["accs"]) == 3
        assert r["mean"] >= 97.0, (name, r)
    assert res["settings"]["1%"]["n_train"] == 10  # 1% of 200 per class, 5 classes


def test_lowshot_random_labels_near_chance():
    xtr, ytr, xte, yte = random_features(n_train=1000)
    res = lowshot_logreg(xtr, ytr, xte, yte, settings=(5, "5%"))
    for r in res["settings"].values():
        assert r["mean"] < CHANCE_MAX


def test_lowshot_cv_and_determinism():
    data = clusters(n_train_per_class=100, sep=3.0)
    grid = (1e-4, 1e-2)
    a = lowshot_logreg(*data, settings=(1, 3), l2="cv", l2_grid=grid, default_l2=1e-3, variant="visrep")
    b = lowshot_logreg(*data, settings=(1, 3), l2="cv", l2_grid=grid, default_l2=1e-3, variant="visrep")
    assert a["settings"] == b["settings"]
    assert a["settings"]["1/class"]["l2"] == [1e-3] * 3  # CV impossible with one image per class
    assert all(v in grid for v in a["settings"]["3/class"]["l2"])
    assert len(a["settings"]["3/class"]["cv"]) == 3


def test_select_l2_by_cv_prefers_regularisation_on_noise():
    """Features without information: every l2 scores the same and the LARGEST (most regularised) wins.
    Pure noise: every held-out score is near chance (scoring the training folds gives 100 % at l2=1e-3).
    A class signal that only a weakly regularised fit can read (two dims share the noise; their
    difference is clean): the small l2 wins by far, so a search that keeps the worst l2 fails too."""
    grid = (1e-3, 1.0, 1e2)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat_interleave(5)
    same = torch.randn(1, 30, generator=g, dtype=torch.float64).expand(20, 30)
    best, scores = select_l2_by_cv(same, y, 4, grid=grid)
    assert set(scores) == set(grid) and len(set(scores.values())) == 1 and best == max(grid)

    noise = torch.randn(20, 60, generator=g, dtype=torch.float64)
    best, scores = select_l2_by_cv(noise, y, 4, grid=grid)
    assert best in grid and max(scores.values()) <= 60, scores

    eps = 2 * torch.randn(20, generator=g, dtype=torch.float64)
    x = torch.stack([y + eps, 10 * eps + 0.05 * torch.randn(20, generator=g, dtype=torch.float64)], 1)
    best, scores = select_l2_by_cv(x, y, 4, grid=grid)
    assert best == 1e-3 and scores[1e-3] >= 90 and scores[1e2] <= 50, scores


# ----------------------------------------------------------------------------------- features
class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 4)
        self.drop = nn.Dropout(0.5)  # must be off during extraction
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        assert not self.training
        return self.drop(self.lin(x.flatten(1)))


def _images(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_extract_tensor_and_dataset_paths_agree():
    enc = _Encoder().train()
    imgs, labels = _images()
    f1, l1 = extract_features(enc, imgs, labels, batch_size=8, progress=False)
    ds = torch.utils.data.TensorDataset(imgs, labels)
    f2, l2 = extract_features(enc, ds, batch_size=5, progress=False)
    assert enc.training  # mode restored
    assert f1.dtype == torch.float32 and l1.dtype == torch.int64 and f1.shape == (37, 4)
    torch.testing.assert_close(f1, f2)
    assert torch.equal(l1, labels) and torch.equal(l2, labels)
    with torch.no_grad():
        enc.eval()
        torch.testing.assert_close(f1, enc.lin(imgs.flatten(1)))
    f1.requires_grad_(True)  # ordinary tensors, not inference tensors


def test_extract_plain_callable_and_errors():
    imgs, labels = _images(5)
    feats, _ = extract_features(lambda x: x, imgs, labels, progress=False)  # 4-D output is flattened
    assert feats.shape == (5, 12)
    with pytest.raises(ValueError):
        extract_features(lambda x: x, imgs, progress=False)  # labels missing
    with pytest.raises(TypeError):
        extract_features(lambda x: (x, x), imgs, labels, progress=False)


def test_feature_cache_round_trip(tmp_path):
    enc = _Encoder()
    imgs, labels = _images()
    path = tmp_path / "sub" / "feats.pt"
    f1, l1 = extract_features(enc, imgs, labels, cache_path=path, cache_key="enc-v1", progress=False)
    calls = enc.calls
    assert path.is_file() and os.listdir(path.parent) == ["feats.pt"]  # no temp file left behind
    f2, l2 = extract_features(enc, imgs, labels, cache_path=path, cache_key="enc-v1", progress=False)
    assert enc.calls == calls  # served from the cache
    assert torch.equal(f1, f2) and torch.equal(l1, l2)
    with torch.no_grad():
        enc.lin.weight.mul_(2)
    f3, _ = extract_features(enc, imgs, labels, cache_path=path, cache_key="enc-v2", progress=False)
    assert enc.calls > calls and not torch.allclose(f1, f3)  # new key: recomputed and overwritten
    assert torch.equal(torch.load(path, weights_only=True)["feats"], f3)
    path.write_bytes(b"garbage")  # a corrupt cache is recomputed
    f4, _ = extract_features(enc, imgs, labels, cache_path=path, cache_key="enc-v2", progress=False)
    torch.testing.assert_close(f3, f4)


def test_extract_train_test(tmp_path):
    imgs, labels = _images()
    fs = extract_train_test(_Encoder(), imgs[:30], imgs[30:], labels[:30], labels[30:], cache_dir=tmp_path,
                            cache_key="k", name="enc", progress=False)
    assert fs["train_feats"].shape == (30, 4) and fs["test_feats"].shape == (7, 4)
    assert sorted(os.listdir(tmp_path)) == ["enc_test.pt", "enc_train.pt"]


# ------------------------------------------------------------------------------------- report
def test_run_protocols_and_report(tmp_path):
    good = clusters(n_train_per_class=100)
    bad = random_features(n_train=500)
    protocols = [("knn", {"ks": (5, 10)}), ("knn", {"ks": 5, "weighting": "uniform", "metric": "euclidean"}),
                 ("linear", {"epochs": 2}), ("lowshot", {"settings": (1, "2%")})]
    keys = ("train_feats", "train_labels", "test_feats", "test_labels")
    results = run_protocols({"pretrained": dict(zip(keys, good)), "random": bad}, protocols, verbose=False)
    assert results["columns"] == ["pretrained", "random"]
    assert results["rows"] == ["k-NN k=5", "k-NN k=10", "k-NN k=5 (uniform, euclidean)", "linear probe",
                               "low-shot 1/class", "low-shot 2%"]
    assert results["table"]["linear probe"]["pretrained"]["value"] > 95
    assert results["table"]["linear probe"]["random"]["value"] < CHANCE_MAX
    md = format_markdown(results)
    lines = md.strip().splitlines()
    assert lines[0] == "| protocol | pretrained | random |" and len(lines) == 2 + 6
    assert "±" in lines[-1]
    md_path, json_path = write_results(results, tmp_path / "out", title="synthetic")
    assert md_path.read_text().startswith("# synthetic")
    loaded = json.loads(json_path.read_text())
    assert loaded["rows"] == results["rows"]
    assert loaded["table"]["k-NN k=5"]["pretrained"]["value"] == pytest.approx(
        results["table"]["k-NN k=5"]["pretrained"]["value"])
    with pytest.raises(ValueError):
        run_protocols({"x": good}, ["svm"], verbose=False)


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_protocols_on_cuda():
    enc = _Encoder()
    imgs, labels = _images(64)
    f_cpu, _ = extract_features(enc, imgs, labels, progress=False)
    f_gpu, l_gpu = extract_features(enc.cuda(), imgs, labels, device="cuda", progress=False)  # bf16 autocast
    assert f_gpu.device.type == "cpu" and f_gpu.dtype == torch.float32 and l_gpu.dtype == torch.int64
    torch.testing.assert_close(f_gpu, f_cpu, atol=0.05, rtol=0.05)
    data = clusters()
    assert knn_classify(*data, device="cuda") == knn_classify(*data)
    assert linear_probe(*data, epochs=3, device="cuda")["test_acc"] >= 99.0
    res = lowshot_logreg(*clusters(n_train_per_class=200), device="cuda")
    assert all(r["mean"] >= 97.0 for r in res["settings"].values())


def test_run_protocols_from_eval_config(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import visrep.eval.lowshot as lowshot_mod
    from visrep.config import EvalConfig
    from visrep.eval import format_table, protocols_from_config, save_results

    cfg = SimpleNamespace(protocols=["knn", "linear", "lowshot"], batch_size=512, knn_k=[5, 10], knn_temperature=0.1,
                          linear_epochs=2, lowshot_shots=[1, 2], lowshot_fraction=0.02, lowshot_seeds=2)
    specs = protocols_from_config(cfg)
    assert specs == [("knn", {"ks": (5, 10), "temperature": 0.1}), ("linear", {"epochs": 2}),
                     ("lowshot", {"settings": (1, 2, "2%"), "n_splits": 2})]
    assert protocols_from_config(vars(cfg)) == specs  # a mapping works too

    # count the low-shot splits (one per seed) and the classifiers fitted on them
    fit_sizes, drawn = [], []
    fit_msn_, lowshot_splits_ = lowshot_mod.fit_logistic_eval, lowshot_mod.lowshot_splits

    def counting_fit(*args, **kwargs):
        labels = list(inspect.signature(fit_msn_).bind(*args, **kwargs).arguments.values())[1]
        fit_sizes.append(int(labels.numel()))
        return fit_msn_(*args, **kwargs)

    def counting_splits(*args, **kwargs):
        bound = inspect.signature(lowshot_splits_).bind(*args, **kwargs)
        bound.apply_defaults()
        splits = lowshot_splits_(*args, **kwargs)
        drawn.append((bound.arguments["setting"], bound.arguments["seed"], [tuple(s.tolist()) for s in splits]))
        return splits

    monkeypatch.setattr(lowshot_mod, "fit_logistic_eval", counting_fit)
    monkeypatch.setattr(lowshot_mod, "lowshot_splits", counting_splits)
    results = run_protocols({"a": clusters(n_train_per_class=100)}, cfg, verbose=False)
    assert results["rows"] == ["k-NN k=5", "k-NN k=10", "linear probe", "low-shot 1/class", "low-shot 2/class",
                               "low-shot 2%"]
    # lowshot_seeds=2: every setting draws two different splits (seeds 0 and 1) and fits one classifier on each
    assert [(setting, seed) for setting, seed, _ in drawn] == [(1, 0), (2, 0), ("2%", 0)]
    for setting, _, splits in drawn:
        assert len(splits) == 2 and len(set(splits)) == 2, setting
    assert fit_sizes == [5, 5, 10, 10, 10, 10]  # 5 classes: 1/class, 2/class, 2% of 100/class; two seeds each
    (lowshot_raw,) = [d["result"] for d in results["details"]["a"] if d["protocol"] == "lowshot"]
    assert list(lowshot_raw["settings"]) == ["1/class", "2/class", "2%"]
    for name, r in lowshot_raw["settings"].items():
        assert len(r["accs"]) == 2 and len(r["l2"]) == 2, name
        assert r["l2"] == [pytest.approx(2.5e-4 / r["n_train"])] * 2, name  # MSN: lambda = 2.5e-4 / N
    for row in ("low-shot 1/class", "low-shot 2/class", "low-shot 2%"):
        assert results["table"][row]["a"]["std"] is not None  # the spread over the two seeds is reported
    table = format_table(results, title="t", notes=["note one"])
    assert table.startswith("# t\n") and table.rstrip().endswith("* note one")
    md, js = save_results(results, table, tmp_path)
    assert md.read_text() == table and json.loads(js.read_text())["columns"] == ["a"]
    assert [name for name, _ in protocols_from_config(EvalConfig())] == ["knn", "linear", "lowshot"]


def test_old_lowshot_variant_name_is_migrated():
    from visrep.config import build_config

    cfg = build_config({"method": {"name": "ijepa"}, "eval": {"lowshot_variant": "msn"}})
    assert cfg.eval.lowshot_variant == "logistic_eval"


def test_lowshot_msn_variant_protocol():
    """MSN's logistic_eval: rows centred on their own mean and normalised (so a per-row offset and scale change
    nothing, which the column-centred visrep variant does not promise), no bias, lambda 2.5e-4 / N; the visrep
    variant keeps its own label."""
    xtr, ytr, xte, yte = clusters(n_train_per_class=50, sep=2.0)
    g = torch.Generator().manual_seed(1)
    warp = lambda x: (x + 5 * torch.randn(len(x), 1, generator=g)) * torch.rand(len(x), 1, generator=g).add(0.5)
    kw = dict(settings=(2,), n_splits=2, solver="lbfgs")
    a = lowshot_logreg(xtr, ytr, xte, yte, **kw)["settings"]["2/class"]
    b = lowshot_logreg(warp(xtr), ytr, warp(xte), yte, **kw)["settings"]["2/class"]
    assert a["accs"] == b["accs"] and a["l2"] == [2.5e-4 / 10] * 2
    v = lowshot_logreg(warp(xtr), ytr, warp(xte), yte, **kw, variant="visrep")["settings"]["2/class"]
    assert v["accs"] != b["accs"]
    res = run_protocols({"a": (xtr, ytr, xte, yte)}, [("lowshot", dict(kw, variant="visrep"))], verbose=False)
    assert res["rows"] == ["low-shot (visrep) 2/class"]
    with pytest.raises(ValueError, match="variant"):
        lowshot_logreg(xtr, ytr, xte, yte, variant="paper")


def test_knn_default_ks_and_small_sets():
    """DINO's k in 10, 20, 100, 200 by default; a k above the training-set size is left out of the table."""
    xtr, ytr, xte, yte = clusters(n_train_per_class=30)  # 150 training rows: 200 does not fit
    assert list(knn_classify(*clusters(n_train_per_class=40))) == [10, 20, 100, 200]
    res = run_protocols({"a": (xtr, ytr, xte, yte)}, ["knn"], verbose=False)
    assert res["rows"] == ["k-NN k=10", "k-NN k=20", "k-NN k=100"]


@pytest.mark.parametrize("blocks,pools,depth", [([1, 4], [False, True], 4), ([1, 4], [False, True], 3),
                                               ([2], [True], 4), ([4, 1], [True, False], 4)])
def test_dinov2_protocols_read_the_official_features(tmp_path, blocks, pools, depth, monkeypatch):
    """DINOv2: the linear probe sweeps eval/linear.py's inputs ([CLS] of the last n blocks, with or without the
    patch average; n above the depth is the depth) and keeps the best on validation; k-NN and low-shot read the
    [CLS] (knn.py / log_regression.py); the runner extracts both and says which input it kept."""
    from test_contract import build, tiny_config

    import visrep.eval
    import visrep.runner as runner
    from visrep.eval import linear_input

    cfg = tiny_config("dinov2", tmp_path, f"model.depth={depth}", f"eval.probe_blocks={blocks}",
                      f"eval.probe_avgpool={pools}", "eval.linear_epochs=1", "eval.lowshot_shots=[1]",
                      "eval.lowshot_seeds=1", "eval.knn_k=[3]")
    method, ds = build(cfg)
    method.eval()
    x, dim = ds.tensors()[0][:5], cfg.model.embed_dim
    fn, about = method.probe_features("linear")
    used = list(dict.fromkeys(min(n, depth) for n in blocks))
    widest = fn(x)
    assert widest.shape[1] == (max(used) + any(pools)) * dim
    assert list(fn.columns) == [f"{n}_blocks_avgpool_{p}" for n in used for p in pools]  # the official order
    for n in used:  # every input is the official create_linear_input, read out of the widest one
        for p in pools:
            want = linear_input(method.eval_module(), method.normalize(x), n, p)
            assert torch.equal(widest[:, fn.columns[f"{n}_blocks_avgpool_{p}"]], want)
    assert f"last {' / '.join(map(str, used))} blocks" in about and ("above the depth" in about) == (depth < 4)
    for protocol in ("knn", "lowshot"):
        assert method.probe_features(protocol) == (method.features, method.feature_description)
    seen = {}
    real = visrep.eval.run_protocols

    def spy(feats, eval_cfg):
        seen.update(feats)
        return real(feats, eval_cfg, verbose=False)

    monkeypatch.setattr(visrep.eval, "run_protocols", spy)  # (the runner imports it when it runs)
    results, table = runner.evaluate_feature_sets({"pretrained": method.features}, cfg, notes=["n"])
    fs = seen["pretrained"]
    swept = fs["linear"]["linear_inputs"]
    assert fs["linear"]["train_feats"].shape[1] == widest.shape[1] and list(swept) == list(fn.columns)
    assert all(torch.equal(swept[k], fn.columns[k]) for k in swept)
    assert fs["default"][0].shape[1] == dim
    kept = next(r["result"]["best"] for r in results["details"]["pretrained"] if r["protocol"] == "linear")
    assert kept["input"] in fn.columns and f"pretrained, linear: kept {kept['input']}" in table
    assert "pretrained, linear: DINOv2 linear inputs" in table and "low-shot: MSN's logistic_eval.py" in table


def test_linear_probe_keeps_the_input_best_on_validation():
    """linear_probe(inputs=...): each input is probed as alone (same split, order, seed) and the one whose best
    configuration is best on validation is kept, as eval/linear.py keeps its best classifier."""
    from visrep.eval import linear_probe

    xtr, ytr, xte, yte = clusters(n_train_per_class=60)
    g = torch.Generator().manual_seed(1)
    noise = lambda n: torch.randn(n, 8, generator=g)  # noqa: E731
    wide_tr, wide_te = torch.cat([noise(len(xtr)), xtr], 1), torch.cat([noise(len(xte)), xte], 1)
    cols = {"noise": torch.arange(8), "signal": torch.arange(8, wide_tr.shape[1]),
            "both": torch.arange(wide_tr.shape[1])}
    kw = dict(epochs=3, lrs=(0.01, 0.1))
    out = linear_probe(wide_tr, ytr, wide_te, yte, inputs=cols, **kw)
    alone = {k: linear_probe(wide_tr[:, c], ytr, wide_te[:, c], yte, **kw) for k, c in cols.items()}
    assert out["inputs"] == {k: r["best"]["val_acc"] for k, r in alone.items()}
    want = max(alone, key=lambda k: alone[k]["best"]["val_acc"])
    assert out["best"]["input"] == want != "noise" and out["test_acc"] == alone[want]["test_acc"]
    assert len(out["table"]) == 3 * 2 and {r["input"] for r in out["table"]} == set(cols)
    with pytest.raises(ValueError, match="columns must lie"):
        linear_probe(wide_tr, ytr, wide_te, yte, inputs={"x": torch.tensor([99])}, **kw)


def test_probe_input_settings_take_one_value_and_refuse_none():
    """eval.probe_blocks was one number: one value is still a sweep of one; an empty sweep is a config error."""
    from visrep.config import load_config, resolve_config
    from visrep.errors import ConfigError

    path = resolve_config("dinov2/fashion_mnist")
    cfg = load_config(path, ["eval.probe_blocks=4", "eval.probe_avgpool=true"])
    assert cfg.eval.probe_blocks == [4] and cfg.eval.probe_avgpool == [True]
    assert load_config(path).eval.probe_blocks == [1, 4]
    for bad in ("eval.probe_blocks=[]", "eval.probe_avgpool=[]"):
        with pytest.raises(ConfigError, match="must each name at least one value"):
            load_config(path, [bad])
    with pytest.raises(ConfigError, match=r"eval.probe_blocks\[1\]"):
        load_config(path, ["eval.probe_blocks=[1, 0]"])
