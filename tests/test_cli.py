"""Command line end to end, and the clear errors users get on bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from visrep.cli import main

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "method.pred_emb_dim=16", "method.pred_depth=1",
        "train.batch_size=8", "train.progress=false", "train.threads=1", "method.min_keep=2"]


def test_unknown_config_key_names_the_key(capsys):
    assert main(["pretrain", "ijepa/fashion_mnist_demo", "optim.lrr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "allowed keys" in err and "lr" in err


def test_bad_value_names_the_key(capsys):
    assert main(["pretrain", "ijepa/fashion_mnist_demo", "train.batch_size=many"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert main(["pretrain", "ijepa/fashion_mnist_demo", "method.loss=l3"]) == 2
    err = capsys.readouterr().err
    assert "method.loss" in err and "smooth_l1" in err


def test_missing_dataset_names_every_option(tmp_path, monkeypatch, capsys):
    import visrep.data.datasets as ds

    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian"))
    code = main(["pretrain", "ijepa/fashion_mnist_demo", f"train.out_dir={tmp_path / 'run'}"] + TINY)
    err = capsys.readouterr().err
    assert code == 2
    assert "data.root" in err and "not set" in err            # the root option
    assert "no-debian" in err and "dataset-fashion-mnist" in err  # the Debian package
    assert "download" in err                                  # torchvision download
    assert not (tmp_path / "run" / "last.pt").exists()


def test_explicit_data_root_without_data_is_an_error(tmp_path, monkeypatch, capsys):
    """data.root=/nonexistent must not train silently on another copy (e.g. Debian's)."""
    import visrep.data.datasets as ds

    debian = tmp_path / "debian"
    debian.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (debian / name).write_bytes(b"")  # a copy is there: it must not be used
    monkeypatch.setattr(ds, "DEBIAN_FASHION_MNIST_DIR", str(debian))
    code = main(["pretrain", "ijepa/fashion_mnist_demo", f"data.root={tmp_path / 'nonexistent'}",
                 f"train.out_dir={tmp_path / 'run'}"] + TINY)
    err = capsys.readouterr().err
    assert code == 2
    assert str(tmp_path / "nonexistent") in err and "train-images-idx3-ubyte" in err
    assert not (tmp_path / "run").exists()


def _image_folder(root: Path, n_per_class: int = 6) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"class{c}" / f"img{i}.png")
    (root / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")


def test_pretrain_on_folder_with_corrupt_image_then_eval_and_export(tmp_path, capsys):
    """A corrupt file is skipped with a warning naming it; the run trains, checkpoints, evaluates, exports."""
    root = tmp_path / "images"
    _image_folder(root)
    out = tmp_path / "run"
    args = ["pretrain", "ijepa/cifar10_vit_tiny", "data.name=imagefolder", f"data.root={root}", "data.image_size=16",
            "model.patch_size=4", f"train.out_dir={out}", "train.max_steps=2", "train.epochs=2", "train.ckpt_every=1"]
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(args + TINY) == 0
    ckpt = out / "last.pt"
    assert ckpt.is_file() and (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] == 2

    # eval on the same folder (train = test here), k-NN only, with raw pixels beside it
    eval_dir = tmp_path / "eval"
    assert main(["eval", str(ckpt), "--protocols", "knn", "--raw-pixels", "--out", str(eval_dir),
                 "--set", "data.in_memory=false", "eval.knn_k=[3]"]) == 0
    results = json.loads((eval_dir / "results.json").read_text())
    assert results and (eval_dir / "results.md").is_file()

    # export: official key names, loadable with safetensors
    from safetensors.torch import load_file

    st = tmp_path / "enc.safetensors"
    assert main(["export", str(ckpt), str(st)]) == 0
    weights = load_file(str(st))
    assert "patch_embed.proj.weight" in weights and "blocks.0.attn.qkv.weight" in weights
    from visrep.hub import load_official

    model = load_official(st)
    assert model.embed_dim == 32


def test_resume_continues_exactly(tmp_path):
    """Stopped at step k and resumed: the same losses, step for step, as an uninterrupted run (I-JEPA)."""
    from visrep.config import load_config
    from visrep.runner import pretrain

    base = TINY + ["data.name=procedural", "data.image_size=16", "model.patch_size=4", "train.epochs=1",
                   "train.ckpt_every=100"]
    cfg_full = load_config("visrep/configs/ijepa/cifar10_vit_tiny.yaml", base + [f"train.out_dir={tmp_path/'a'}",
                                                                               "train.max_steps=6"])
    _, full = pretrain(cfg_full)
    cfg_part = load_config("visrep/configs/ijepa/cifar10_vit_tiny.yaml", base + [f"train.out_dir={tmp_path/'b'}",
                                                                               "train.max_steps=3"])
    _, first = pretrain(cfg_part)
    cfg_rest = load_config("visrep/configs/ijepa/cifar10_vit_tiny.yaml", base + [f"train.out_dir={tmp_path/'b'}",
                                                                               "train.max_steps=6"])
    _, rest = pretrain(cfg_rest, resume=True)
    assert first.losses + rest.losses == full.losses
    assert len(full.losses) == 6


def test_train_subset_of_a_folder_keeps_what_the_dataset_tells(tmp_path):
    from visrep.config import load_config
    from visrep.runner import data_info, load_split, uint8_eval_transform

    _image_folder(tmp_path / "images")
    cfg = load_config(None, ["method.name=ijepa", "data.name=imagefolder", f"data.root={tmp_path / 'images'}",
                             "data.train_subset=5", "data.image_size=16", "model.patch_size=4"])
    ds = load_split(cfg, "train")
    assert len(ds) == 5 and ds.num_classes == 2 and ds.targets == [0] * 5
    info = data_info(cfg, ds)
    assert (info.in_chans, info.num_classes, info.classes) == (3, 2, ("class0", "class1"))
    ds.transform = uint8_eval_transform(16)  # reaches the wrapped folder
    assert ds[0][0].shape == (3, 16, 16) and ds.dataset.transform is ds.transform


@pytest.mark.parametrize("given,expected", [(None, "1"), ("0", "0")])
def test_import_turns_on_huge_pages_for_torch_unless_set(given, expected):
    """`import visrep` before torch sets THP_MEM_ALLOC_ENABLE=1 (2 MiB pages for PyTorch's large CPU
    tensors); a value the user set is kept."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    out = subprocess.run([sys.executable, "-c", "import os, visrep; print(os.environ['THP_MEM_ALLOC_ENABLE'])"],
                         env=env, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == expected
