"""MSN / PMSN / PAWS method details not covered by the contract and parity tests."""
import pytest
import torch

from visrep.config import ConfigError, load_config
from visrep.methods import build_method
from visrep.methods.base import DataInfo
from visrep.methods.msn import num_kept
from visrep.models import VisionTransformer, encode_views

INFO = DataInfo(in_chans=3, image_size=16, num_classes=6)


def _cfg(name, *overrides):
    return load_config(f"visrep/configs/{name}/tiny.yaml", ["train.out_dir=/tmp/unused", *overrides])


def test_patch_drop_masks_only_the_first_run_of_views():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, pos_embed="learned",
                            class_token=True, interpolate_offset=0.0, interpolate_float32=False)
    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    keep = torch.randperm(16)[:num_kept(16, 0.25)].expand(2, -1)
    masked, full = encode_views(vit, views, keep), encode_views(vit, views, None)
    assert masked.shape == (6, 32)
    assert not torch.allclose(masked[:2], full[:2])
    torch.testing.assert_close(masked[2:], full[2:])          # focal views are never masked


def test_pmsn_is_msn_with_a_power_law_prior():
    msn, pmsn = (build_method(_cfg(n), INFO) for n in ("msn", "pmsn"))
    assert msn.prior is None and type(msn) is type(pmsn)
    k = pmsn.prototypes.shape[0]
    w = torch.arange(1, k + 1, dtype=torch.float64) ** -0.25
    torch.testing.assert_close(pmsn.prior.double(), w / w.sum())
    flat = build_method(_cfg("pmsn", "method.prior_exponent=0"), INFO)
    torch.testing.assert_close(flat.prior, torch.full((k,), 1.0 / k, dtype=torch.float64))


def test_prototype_gradient_is_summed_over_processes(monkeypatch):
    from visrep import distributed as D
    from visrep.methods.base import Step

    method = build_method(_cfg("msn", "method.proto_grad_reduce=sum", "method.clip_grad=null"), INFO)
    method.prototypes.grad = torch.ones_like(method.prototypes)
    monkeypatch.setattr(D, "world_in", lambda group=None: 2)
    method.before_optimizer_step(Step(0, 0, 10, 5))
    assert torch.equal(method.prototypes.grad, torch.full_like(method.prototypes, 2.0))
    groups = method.param_groups()
    proto = [g for g in groups if any(p is method.prototypes for p in g["params"])]
    assert len(proto) == 1 and proto[0]["wd_exclude"] and proto[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("name, override, words", [
    ("msn", "model.class_token=false", "class_token"),
    ("msn", "optim.clip_grad=1.0", "method.clip_grad"),
    ("msn", "method.focal_size=10", "focal_size"),
    ("msn", "method.patch_drop=1.0", "patch_drop"),
    ("paws", "method.label_fraction=0.1", "exactly one"),
    ("paws", "model.class_token=false", "class_token"),
])
def test_bad_configs_are_rejected(name, override, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(name, override)


def _snn_by_hand(method, sup_x, sup_y, query_x, query_y) -> float:
    """The paper's soft nearest-neighbour top-1 (%) written out: eval-mode embeddings after the heads,
    cosine similarities / tau, softmax over the supports, one-hot labels, argmax."""
    was = method.training
    method.eval()
    with torch.no_grad():
        def emb(x):
            return torch.nn.functional.normalize(method.embed([method.normalize(x)])[1], dim=1)

        p = torch.softmax(emb(query_x) @ emb(sup_x).T / method.cfg.temperature, dim=1)
        scores = p @ torch.nn.functional.one_hot(sup_y, method.num_classes).to(p)
    method.train(was)
    return (scores.argmax(1) == query_y).double().mean().item() * 100


def test_paws_snn_accuracy_uses_the_training_labelled_subset():
    torch.manual_seed(0)
    method = build_method(_cfg("paws"), INFO).eval()
    labels = torch.arange(6).repeat(10)
    idx = method.labelled_subset(labels)
    assert idx.numel() == 6 * 4 and torch.equal(labels[idx].bincount(), torch.full((6,), 4))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=g)
    # the queries are exact copies of training images OUTSIDE the labelled subset, with another label: supports
    # taken from the whole training set would find each query's mislabelled twin
    outside = torch.tensor([j for j in range(60) if j not in set(idx.tolist())][:12])
    queries, query_labels = images[outside].clone(), (labels[outside] + 1) % 6
    acc = method.snn_accuracy(images, labels, queries, query_labels)
    assert acc == pytest.approx(_snn_by_hand(method, images[idx], labels[idx], queries, query_labels), abs=1e-4)
    assert acc != pytest.approx(_snn_by_hand(method, images, labels, queries, query_labels), abs=1e-4)


def test_long_tailed_subset_and_label_split_files(tmp_path):
    from visrep.data.subsets import (
        label_split,
        long_tailed_counts,
        long_tailed_indices,
        read_label_split,
        write_label_split,
    )

    counts = long_tailed_counts(10, 1000, 100.0, "power")
    assert counts[0] == 1000 and counts[-1] == 10 and counts == sorted(counts, reverse=True)
    assert long_tailed_counts(10, 1000, 100.0, "exponential")[-1] == 10
    labels = torch.arange(10).repeat_interleave(200)
    idx = long_tailed_indices(labels, 20.0, seed=3)
    got = labels[idx].bincount(minlength=10)
    assert got[0] == 200 and got[-1] == 10
    assert torch.equal(idx, long_tailed_indices(labels, 20.0, seed=3))
    split = label_split(labels, per_class=5, seed=1)
    assert torch.equal(labels[split].bincount(), torch.full((10,), 5))
    path = write_label_split(tmp_path / "5imgs_class.txt", split, comment="5 per class\nseed 1")
    assert torch.equal(read_label_split(path), split)
    # PAWS's supports come from exactly the file's images
    method = build_method(_cfg("paws", "method.labels_per_class=null", f"method.labels_file={path}"), INFO)
    sub = label_split(torch.arange(6).repeat(10), per_class=2, seed=0)
    write_label_split(path, sub)
    assert torch.equal(method.labelled_subset(torch.arange(6).repeat(10)), sub)


def test_long_tailed_training_split():
    from visrep.runner import load_split

    cfg = _cfg("msn", "data.long_tail_ratio=10")
    counts = load_split(cfg, "train").tensors()[1].bincount()
    assert counts.max() / counts.min() == pytest.approx(10, rel=0.1)


def test_paws_resnet_backbone_trains_one_step():
    from visrep.methods.base import Step

    cfg = _cfg("paws", "method.backbone=resnet18", "method.mc_size=12")
    method = build_method(cfg, INFO)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    sup = {"image": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), "label": torch.arange(4).repeat(2)}
    batch = method.prepare_batch({"image": x, "label": torch.zeros(4, dtype=torch.long), "index": torch.arange(4),
                                  "supports": sup}, g)
    out = method.training_step(batch, Step(0, 0, 10, 5))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and method.encoder.net.conv1.weight.grad is not None
    assert method.features(x).shape == (4, method.feature_dim) == (4, 512)


def test_snn_protocol_through_the_runner(tmp_path):
    from visrep.engine import train
    from visrep.runner import eval_context, evaluate_checkpoint, load_split, load_trained

    cfg = _cfg("paws", "train.max_steps=1", f"train.out_dir={tmp_path}")
    ds = load_split(cfg, "train")
    torch.manual_seed(0)
    method = build_method(cfg, INFO)
    result = train(cfg, method, ds)
    out, _ = evaluate_checkpoint([result.checkpoint], protocols=["snn"], out_dir=str(tmp_path / "eval"))
    (value,) = out["method_protocols"].values()
    # the same number by hand: the checkpoint's network, supports = the labelled subset of the training split,
    # queries = the test split
    ckpt_cfg, trained, _ = load_trained(result.checkpoint)
    ctx = eval_context(ckpt_cfg)
    (_, x, y), (_, xt, yt) = ctx.split("train"), ctx.split("test")
    idx = trained.labelled_subset(y)
    assert value == pytest.approx(_snn_by_hand(trained, x[idx], y[idx], xt, yt), abs=1e-4)   # float32 mean


def test_wide_resnet_28_2_shapes_keys_and_paws_backbone(tmp_path):
    from visrep.config import load_config
    from visrep.engine import train
    from visrep.hub import export_safetensors, load_exported
    from visrep.methods import build_method
    from visrep.models.wide_resnet import wide_resnet28_2
    from visrep.runner import data_info, load_split

    net = wide_resnet28_2()
    # counted by hand: stem 448 + stages 70,400 + 280,064 + 1,117,184 (convs with biases, 1x1 shortcuts) + final BN 256
    assert net.embed_dim == 128 and sum(p.numel() for p in net.parameters()) == 1_468_352
    keys = net.state_dict().keys()
    for k in ("conv1.weight", "layer1.0.shortcut.0.weight", "layer3.3.conv2.bias", "bn1.running_mean"):
        assert k in keys, k  # the official suncet key names
    assert net.bn1.momentum == 0.99
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 1, 128)
    cfg = load_config("visrep/configs/paws/tiny.yaml", ["method.backbone=wrn28_2", f"train.out_dir={tmp_path}",
                                                        "train.max_steps=2"])
    ds = load_split(cfg, "train")
    method = build_method(cfg, data_info(cfg, ds))
    result = train(cfg, method, ds)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert method.features(ds.tensors()[0][:3]).shape == (3, 128)
    # official PAWS init_model builds WRN-28-2 with dropout_rate=0.0 (the class default is 0.3)
    assert all(m.p == 0.0 for m in method.encoder.modules() if isinstance(m, torch.nn.Dropout))
    path = export_safetensors(method.encoder, tmp_path / "wrn.safetensors", metadata={
        "class": "WideResNet", "arch": method.encoder.arch})
    rebuilt = load_exported(path)
    for k, v in method.encoder.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


def test_finetune_subset_labelled_split_file_and_random(tmp_path):
    from visrep.data.subsets import write_label_split
    from visrep.runner import eval_context, load_split

    def finetune_set(method, cfg):
        return eval_context(cfg).finetune_set(method)

    cfg = _cfg("paws", "eval.finetune_subset=labelled", "eval.finetune_samples=7")
    y = load_split(cfg, "train").tensors()[1]
    method = build_method(cfg, INFO)
    x, y2, keep = finetune_set(method, cfg)
    assert torch.equal(y2, y) and torch.equal(keep, method.labelled_subset(y))   # the supports' pool
    split = write_label_split(tmp_path / "split.txt", torch.tensor([3, 1, 4]))
    assert finetune_set(method, _cfg("paws", f"eval.finetune_subset={split}"))[2].tolist() == [3, 1, 4]
    assert len(finetune_set(method, _cfg("paws", "eval.finetune_samples=7"))[2]) == 7
    bad = write_label_split(tmp_path / "bad.txt", torch.tensor([len(x)]))
    with pytest.raises(ValueError, match="outside"):
        finetune_set(method, _cfg("paws", f"eval.finetune_subset={bad}"))
    msn_cfg = _cfg("msn", "eval.finetune_subset=labelled")
    with pytest.raises(ValueError, match="without a labelled subset"):
        finetune_set(build_method(msn_cfg, INFO), msn_cfg)


def test_paws_finetune_on_its_labelled_subset_through_the_runner(tmp_path, monkeypatch):
    import visrep.eval.finetune as finetune_module
    from visrep.engine import train
    from visrep.optim.groups import layer_decay_groups
    from visrep.runner import evaluate_checkpoint, load_split

    cfg = _cfg("paws", "train.max_steps=1", f"train.out_dir={tmp_path}")
    method = build_method(cfg, INFO)
    train_x, train_y = load_split(cfg, "train").tensors()[:2]
    result = train(cfg, method, load_split(cfg, "train"))
    calls, real = [], finetune_module.finetune_encoder

    def spy(*args, **kwargs):   # pass-through: records what each fine-tuning run learns from and returns
        out = real(*args, **kwargs)
        calls.append((args[4], out["top1"]))
        return out

    monkeypatch.setattr(finetune_module, "finetune_encoder", spy)
    out, _ = evaluate_checkpoint([result.checkpoint], protocols=["finetune"], out_dir=str(tmp_path / "eval"),
                                 overrides=["eval.finetune_subset=labelled", "eval.finetune_epochs=2"])
    (value,) = out["method_protocols"].values()
    assert set(value) == {"pretrained", "random init"} and len(calls) == 2
    idx = method.labelled_subset(train_y)
    for (x, y), _ in calls:     # both networks learn from exactly the images whose labels PAWS used
        assert torch.equal(x, train_x[idx]) and torch.equal(y, train_y[idx])
    assert sorted(value.values()) == sorted(top1 for _, top1 in calls)
    # a ResNet / WRN has no blocks: one lr throughout
    from visrep.models.wide_resnet import wide_resnet28_2
    groups = layer_decay_groups(wide_resnet28_2(), 0.75, lr=0.1)
    assert {g["lr"] for g in groups} == {0.1}
