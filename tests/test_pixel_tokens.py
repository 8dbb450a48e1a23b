"""Pixels as tokens (PiT): patch size 1, the locality control, MAE masking and loss, the supervised
recipe, and the end-to-end fine-tuning protocol."""
from __future__ import annotations

import pytest
import torch

from visrep.config import ConfigError, load_config
from visrep.methods import build_method
from visrep.methods.base import DataInfo
from visrep.methods.mae import mae_loss, patchify, random_masking, unpatchify
from visrep.models import VisionTransformer

INFO = DataInfo(in_chans=1, image_size=8, num_classes=4, mean=(0.5,), std=(0.5,))


def pixel_vit(**kw) -> VisionTransformer:
    args = dict(img_size=8, patch_size=1, in_chans=1, embed_dim=16, depth=2, num_heads=2, pos_embed="learned")
    return VisionTransformer(**{**args, **kw}).eval()


def test_patch_size_one_gives_one_token_per_pixel():
    for size, chans in ((8, 1), (6, 3)):
        vit = pixel_vit(img_size=size, in_chans=chans)
        assert vit(torch.randn(2, chans, size, size)).shape == (2, size * size, 16)


def test_shuffled_order_really_permutes_and_is_fixed_across_images():
    vit = pixel_vit(pixel_permutation=3)
    perm = vit.pixel_perm
    assert sorted(perm.tolist()) == list(range(64)) and not torch.equal(perm, torch.arange(64))
    images = torch.randn(3, 1, 8, 8)
    out = vit.permute_pixels(images)
    for i in range(3):  # the same permutation for every image
        assert torch.equal(out[i].flatten(), images[i].flatten()[perm])
    assert torch.equal(pixel_vit(pixel_permutation=3).pixel_perm, perm)         # fixed by its seed
    assert not torch.equal(pixel_vit(pixel_permutation=4).pixel_perm, perm)
    with pytest.raises(ValueError, match="fixed for"):
        vit.permute_pixels(torch.randn(1, 1, 4, 4))


def test_pixel_tokens_with_learned_positions_have_no_locality_prior():
    """At patch size 1 a fixed pixel order is the same model as one whose position table is
    permuted: pooled features agree exactly (what the shuffled-order control tests)."""
    torch.manual_seed(0)
    shuffled = pixel_vit(pixel_permutation=7)
    plain = pixel_vit()
    plain.load_state_dict(shuffled.state_dict())
    with torch.no_grad():
        table = shuffled.pos_embed[0]
        plain.pos_embed[0, shuffled.pixel_perm] = table      # pixel perm[j] now carries position j
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(shuffled.pooled(x), plain.pooled(x), rtol=1e-5, atol=1e-5)
    patches = VisionTransformer(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=2, num_heads=2,
                                pos_embed="learned", pixel_permutation=7).eval()
    assert patches(x).shape == (4, 16, 16)  # larger patches group shuffled pixels: a different model


def test_long_sequences_use_the_tiled_kernel_and_agree_with_short_path():
    from torch.nn.attention import SDPBackend

    from visrep.models.vit import CPU_FLASH_MIN_TOKENS, cpu_attention_backends

    long_x, short_x = torch.zeros(1, CPU_FLASH_MIN_TOKENS, 8), torch.zeros(1, 16, 8)
    assert cpu_attention_backends(long_x) == [SDPBackend.FLASH_ATTENTION]
    assert cpu_attention_backends(short_x) == [SDPBackend.MATH]
    vit = pixel_vit(img_size=16).double()  # 256 tokens: flash; compare with the math kernel
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    import visrep.models.vit as V

    saved = V.CPU_FLASH_MIN_TOKENS
    try:
        V.CPU_FLASH_MIN_TOKENS = 10**9
        ref = vit(x)
    finally:
        V.CPU_FLASH_MIN_TOKENS = saved
    torch.testing.assert_close(vit(x), ref, rtol=1e-10, atol=1e-10)


def test_random_masking_splits_every_token_once():
    g = torch.Generator().manual_seed(0)
    keep, masked = random_masking(5, 50, 0.75, g)
    assert keep.shape == (5, 12) and masked.shape == (5, 38)          # K = int(N (1 - r)), as official
    for k, m in zip(keep, masked):
        assert sorted(torch.cat([k, m]).tolist()) == list(range(50))
    assert not torch.equal(keep[0], keep[1])                           # a different subset per sample
    again, _ = random_masking(5, 50, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(again, keep)


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 12)
    for p in (1, 2, 4):
        t = patchify(x, p)
        assert t.shape == (2, (8 // p) * (12 // p), p * p * 3)
        assert torch.equal(unpatchify(t, p, 3, 8, 12), x)
    assert torch.equal(patchify(x, 1)[0, 13], x[0, :, 1, 1])           # token 13 = pixel (1, 1) of a 12-wide row


def test_mae_loss_counts_masked_tokens_only():
    cfg = load_config("visrep/configs/mae/tiny.yaml", ["data.image_size=8", "model.embed_dim=16"])
    info = DataInfo(in_chans=1, image_size=8, mean=(0.0,), std=(1.0,))
    torch.manual_seed(0)
    mae = build_method(cfg, info)
    images = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(2, 1, 1, 1) / 64
    keep, masked = random_masking(2, 64, 0.75, torch.Generator().manual_seed(1))
    # the targets are exactly the masked pixels (values encode their index)
    assert torch.equal((mae.targets(images, masked)[..., 0] * 64).round().long(), masked)
    # changing a visible pixel's target cannot change the loss's target term; a masked one does
    pred = torch.zeros(2, masked.size(1), 1)
    base = mae_loss(pred, mae.targets(images, masked))
    assert base == pytest.approx(((images.flatten(1).gather(1, masked)) ** 2).mean().item())
    assert torch.equal(mae_loss(pred, pred), torch.zeros(()))
    # a training step's loss: the decoder predicts the masked tokens only
    batch = {"image": images, "keep": keep, "masked": masked}
    out = mae.training_step(batch, step=None)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_mae_norm_pix_is_refused_for_single_value_patches():
    cfg = load_config("visrep/configs/mae/tiny.yaml", ["method.norm_pix_loss=true"])
    with pytest.raises(ConfigError, match="norm_pix_loss"):
        build_method(cfg, DataInfo(in_chans=1, image_size=16))
    build_method(cfg, DataInfo(in_chans=3, image_size=16))  # 3 values per patch: allowed


def test_mae_reconstruction_keeps_visible_pixels():
    cfg = load_config("visrep/configs/mae/tiny.yaml")
    mae = build_method(cfg, DataInfo(in_chans=3, image_size=16, mean=(0.0,) * 3, std=(1.0,) * 3)).eval()
    images = torch.rand(2, 3, 16, 16)
    recon, mask = mae.reconstruct(images, torch.Generator().manual_seed(0))
    assert recon.shape == images.shape and mask.shape == (2, 1, 16, 16)
    assert mask.mean().item() == pytest.approx(0.75, abs=1 / 256)
    visible = mask.expand_as(images) == 0
    assert torch.equal(recon[visible], images[visible])


def test_supervised_targets_mixup_and_validation():
    cfg = load_config("visrep/configs/supervised/tiny.yaml")
    info = DataInfo(in_chans=1, image_size=16, num_classes=4)
    sup = build_method(cfg, info)
    batch = {"image": torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8), "label": torch.arange(8) % 4,
             "index": torch.arange(8)}
    a = sup.prepare_batch(batch, torch.Generator().manual_seed(0))
    b = sup.prepare_batch(batch, torch.Generator().manual_seed(0))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])  # seeded
    assert a["target"].shape == (8, 4)
    torch.testing.assert_close(a["target"].sum(-1), torch.ones(8))
    plain = build_method(load_config("visrep/configs/supervised/tiny.yaml",
                                     ["method.mixup=0", "method.cutmix=0", "method.label_smoothing=0.2"]), info)
    t = plain.prepare_batch(batch, torch.Generator().manual_seed(0))["target"]
    assert t.max().item() == pytest.approx(0.8 + 0.05) and t.min().item() == pytest.approx(0.05)
    with pytest.raises(ConfigError, match="class_token"):
        load_config("visrep/configs/supervised/tiny.yaml", ["method.pool=cls"])
    with pytest.raises(ConfigError, match="even"):
        load_config("visrep/configs/supervised/tiny.yaml", ["train.batch_size=7"])
    with pytest.raises(ValueError, match="labels"):
        build_method(cfg, DataInfo(in_chans=1, image_size=16))


def test_layer_decay_groups():
    from torch import nn

    from visrep.optim.groups import layer_decay_groups

    vit, head = pixel_vit(), nn.Linear(16, 3)
    groups = layer_decay_groups(vit, 0.5, head=head, lr=1.0)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale[id(vit.pos_embed)] == 0.5 ** 3 and scale[id(vit.blocks[0].attn.qkv.weight)] == 0.5 ** 2
    assert scale[id(vit.blocks[1].mlp.fc1.weight)] == 0.5 and scale[id(head.weight)] == 1.0
    assert all(g["lr"] == g["lr_scale"] for g in groups)
    assert len(scale) == sum(p.requires_grad for p in [*vit.parameters(), *head.parameters()])


def test_finetune_protocol_through_the_runner(tmp_path, monkeypatch):
    """The runner's ``finetune`` protocol fine-tunes the TRAINED encoder ("pretrained") and a fresh one ("random
    init") and reports, under each name, the top-1 that the fine-tuned classifier really has on the test split
    (recomputed here by spies around the real functions; each call's number is tagged so that a swap of the two
    results fails even when both accuracies coincide)."""
    import visrep.eval.finetune as ft
    from visrep.engine import train
    from visrep.eval import protocols as P
    from visrep.runner import data_info, eval_context, load_split

    cfg = load_config("visrep/configs/mae/tiny.yaml", [f"train.out_dir={tmp_path}", "train.max_steps=2",
                                                       "eval.finetune_epochs=1", "eval.finetune_samples=64"])
    ds = load_split(cfg, "train")
    method = build_method(cfg, data_info(cfg, ds))
    train(cfg, method, ds)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    _, test_images, test_labels = eval_context(cfg).split("test")
    calls = {}
    real_finetune, real_train = ft.finetune_encoder, ft.train_classifier

    def spy_finetune(network, vit, feature_dim, num_classes, train_set, test_set, *args, desc, **kwargs):
        xs = train_set[0][:4]
        was = network.training
        with torch.no_grad():
            feats = network.eval()(xs)
        network.train(was)
        calls[desc] = {"vit": {k: v.clone() for k, v in vit.state_dict().items()}, "feats": feats,
                       "ref": method.features(xs)}
        return real_finetune(network, vit, feature_dim, num_classes, train_set, test_set, *args, desc=desc, **kwargs)

    def spy_train(model, groups, train_set, test_set, *args, desc, **kwargs):
        out = real_train(model, groups, train_set, test_set, *args, desc=desc, **kwargs)
        assert torch.equal(test_set[0], test_images) and torch.equal(test_set[1], test_labels)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xb).argmax(-1) for xb in test_images.split(64)])
        top1 = 100.0 * (pred == test_labels).double().mean().item()
        assert out["top1"] == pytest.approx(top1, abs=1e-9), desc              # what it measured is real
        # a distinct tag per call traces which call's number the protocol reports under which name
        calls[desc]["top1"] = top1 + 1e-3 * len([c for c in calls.values() if "top1" in c]) + 1e-3
        return {**out, "top1": calls[desc]["top1"]}

    monkeypatch.setattr(ft, "finetune_encoder", spy_finetune)
    monkeypatch.setattr(ft, "train_classifier", spy_train)
    out = P.run("finetune", method, eval_context(cfg))
    assert set(out) == {"pretrained", "random init"}
    pre, rnd = calls["fine-tune (pretrained)"], calls["fine-tune (random init)"]
    for name, call in (("pretrained", pre), ("random init", rnd)):
        assert out[name] == pytest.approx(call["top1"], abs=1e-9), name   # this net's own (tagged) number
    trained = method.encoder.state_dict()
    assert all(torch.equal(pre["vit"][k], v) for k, v in trained.items())  # starts from the trained encoder
    torch.testing.assert_close(pre["feats"], pre["ref"])                 # ... through the method's features
    assert not all(torch.equal(rnd["vit"][k], v) for k, v in trained.items() if v.is_floating_point())
    for k, v in method.state_dict().items():  # fine-tuning works on a copy
        assert torch.equal(v, before[k]), k
    net = method.finetune_network()
    assert all(p.requires_grad for p in net.vit.parameters())
    assert not any(p.requires_grad for p in net.method.decoder.parameters())
    net(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)).sum().backward()
    assert net.vit.blocks[0].attn.qkv.weight.grad is not None
