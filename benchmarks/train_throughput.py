"""Train-step throughput and peak memory of I-JEPA, side by side with baselines, as ratios.

Variants, each timed in its own subprocess (clean peak-memory figures) on the same shapes:

* ``visrep``     our full I-JEPA step: masks, target forward, context encoder, predictor,
                 smooth-L1, backward, AdamW, EMA (``visrep.methods.ijepa``).
* ``supervised`` a plain reference step: the same ViT trained supervised on the full image
                 (average-pooled tokens -> linear head -> cross-entropy, AdamW).
* ``official``   the official I-JEPA step (facebookresearch/ijepa), imported from a checkout
                 given with ``--official PATH`` (never vendored): its ViT, predictor, MaskCollator,
                 apply_masks/repeat_interleave_batch, its per-parameter EMA loop.
* ``stop``       our StoP step (``visrep.methods.stop``: I-JEPA's plus the noise through the tied
                 projection), and ``official-stop`` the official StoP step (amirbar/StoP ``src/deit.py``:
                 its ViT and predictor with ``apply_stop``, which checkpoints every attention and MLP),
                 from a checkout given with ``--official-stop PATH``.

    python benchmarks/train_throughput.py --variants stop,official-stop --official-stop /path/to/StoP

    python benchmarks/train_throughput.py --size tiny --img 28 --patch 4 --in-chans 1 --batch 64
    python benchmarks/train_throughput.py --size base --img 224 --patch 16 --batch 64 --device cuda \
        --official /path/to/ijepa

On CUDA every variant is also timed under bf16 autocast. Output: a Markdown table with images/s,
ms/step and peak memory per variant and the ratios visrep/official and visrep/supervised;
``--out`` writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from visrep.models.vit import VIT_SIZES as SIZES  # noqa: E402  (the one size table)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _masks(args, seed):
    """Masks from our collator for a batch (both implementations get the same index tensors)."""
    import torch

    from visrep.data.masks import MultiBlockMaskCollator

    torch.manual_seed(seed)
    coll = MultiBlockMaskCollator(args.img, args.patch, npred=4, min_keep=min(10, (args.img // args.patch) ** 2 // 8))
    return coll.sample(args.batch)


def build_visrep(args, device, method: str = "ijepa"):
    import torch

    from visrep.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from visrep.engine.step import train_step
    from visrep.methods import DataInfo, Step
    from visrep.methods.ijepa import IJEPA, IJEPAConfig
    from visrep.methods.stop import StoP, StoPConfig
    from visrep.optim import build_optimizer, resolve_optim_defaults

    dim, depth, heads = SIZES[args.size]
    cls, mcfg = (StoP, StoPConfig) if method == "stop" else (IJEPA, IJEPAConfig)
    cfg = Config(method=mcfg(pred_depth=args.pred_depth, pred_emb_dim=args.pred_dim, min_keep=4),
                 data=DataConfig(image_size=args.img),
                 model=ModelConfig(patch_size=args.patch, embed_dim=dim, depth=depth, num_heads=heads,
                                   grad_checkpointing=getattr(args, "grad_checkpointing", False)),
                 optim=resolve_optim_defaults(OptimConfig()), train=TrainConfig())
    info = DataInfo(in_chans=args.in_chans, image_size=args.img, num_classes=10, mean=(0.5,) * args.in_chans,
                    std=(0.5,) * args.in_chans)
    method_name = method
    method = cls(cfg, info).to(device)
    opt = build_optimizer(method.param_groups(), cfg.optim)
    if args.compile:
        method.training_step = torch.compile(method.training_step)

    def step(imgs, labels, masks_enc, masks_pred, i):
        info = Step(step=i, epoch=0, total_steps=10_000, steps_per_epoch=1000)
        batch = {"image": imgs, "label": labels, "masks_enc": masks_enc, "masks_pred": masks_pred}
        if method_name == "stop":  # the noise as prepare_batch draws it (per sample, on the device)
            batch["stop_noise"] = [torch.randn(imgs.size(0), 1, m.size(1), dim, device=device) * 0.25
                                   for m in masks_pred]
        train_step(method, batch, info, opt)  # the engine's hook order (visrep.engine.step)
    return step


def build_supervised(args, device):
    import torch
    import torch.nn.functional as F

    from visrep.models import VisionTransformer

    dim, depth, heads = SIZES[args.size]
    vit = VisionTransformer(img_size=args.img, patch_size=args.patch, in_chans=args.in_chans, embed_dim=dim,
                            depth=depth, num_heads=heads).to(device)
    vit.grad_checkpointing = getattr(args, "grad_checkpointing", False)
    head = torch.nn.Linear(dim, 10).to(device)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=1e-3)

    def step(imgs, labels, masks_enc, masks_pred, i):
        loss = F.cross_entropy(head(vit(imgs).mean(1)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def build_official(args, device):
    """The official step, as src/train.py runs it (no DDP/AllReduce on one process)."""
    import copy
    from functools import partial

    import torch
    import torch.nn.functional as F

    if not args.official or not Path(args.official, "src", "models", "vision_transformer.py").is_file():
        raise SystemExit("--official must point to a checkout of facebookresearch/ijepa")
    sys.path.insert(0, str(Path(args.official).resolve()))
    from src.masks.utils import apply_masks
    from src.models.vision_transformer import VisionTransformer, vit_predictor
    from src.utils.tensors import repeat_interleave_batch

    dim, depth, heads = SIZES[args.size]
    enc = VisionTransformer(img_size=[args.img], patch_size=args.patch, in_chans=args.in_chans, embed_dim=dim,
                            depth=depth, num_heads=heads, qkv_bias=True,
                            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).to(device)
    pred = vit_predictor(num_patches=enc.patch_embed.num_patches, embed_dim=dim, predictor_embed_dim=args.pred_dim,
                         depth=args.pred_depth, num_heads=heads).to(device)
    target = copy.deepcopy(enc)
    for p in target.parameters():
        p.requires_grad = False
    groups = [
        {"params": (p for n, p in enc.named_parameters() if ("bias" not in n) and (len(p.shape) != 1))},
        {"params": (p for n, p in pred.named_parameters() if ("bias" not in n) and (len(p.shape) != 1))},
        {"params": (p for n, p in enc.named_parameters() if ("bias" in n) or (len(p.shape) == 1)), "WD_exclude": True,
         "weight_decay": 0},
        {"params": (p for n, p in pred.named_parameters() if ("bias" in n) or (len(p.shape) == 1)), "WD_exclude": True,
         "weight_decay": 0},
    ]
    opt = torch.optim.AdamW(groups)
    m = 0.996

    def step(imgs, labels, masks_enc, masks_pred, i):
        with torch.no_grad():
            h = target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = apply_masks(h, masks_pred)
            h = repeat_interleave_batch(h, imgs.size(0), repeat=len(masks_enc))
        z = pred(enc(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for param_q, param_k in zip(enc.parameters(), target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
    return step


def build_official_stop(args, device):
    """The official StoP step as main.py runs it on one process: its ViT and predictor (apply_stop,
    sigma 0.25, activation checkpointing in every block as released), targets gathered per mask and
    ``repeat_interleave``d, smooth-L1, AdamW over the official groups, per-parameter EMA."""
    import copy
    from functools import partial

    import torch
    import torch.nn.functional as F

    if not args.official_stop or not Path(args.official_stop, "src", "deit.py").is_file():
        raise SystemExit("--official-stop must point to a checkout of amirbar/StoP")
    sys.path.insert(0, str(Path(args.official_stop).resolve()))
    import src.deit as deit

    dim, depth, heads = SIZES[args.size]
    enc = deit.VisionTransformer(img_size=[args.img], patch_size=args.patch, in_chans=args.in_chans, embed_dim=dim,
                                 depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                 norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).to(device)
    pred = deit.deit_predictor(num_patches=enc.patch_embed.num_patches, embed_dim=dim,
                               predictor_embed_dim=args.pred_dim, depth=args.pred_depth, num_heads=heads,
                               apply_stop=True, noise_var=0.25).to(device)
    target = copy.deepcopy(enc)
    for p in target.parameters():
        p.requires_grad = False
    groups = [
        {"params": [p for n, p in m.named_parameters() if ("bias" not in n) and (len(p.shape) != 1)]}
        for m in (enc, pred)] + [
        {"params": [p for n, p in m.named_parameters() if ("bias" in n) or (len(p.shape) == 1)],
         "WD_exclude": True, "weight_decay": 0} for m in (enc, pred)]
    opt = torch.optim.AdamW(groups)
    m = 0.996

    def step(imgs, labels, masks_enc, masks_pred, i):
        with torch.no_grad():
            h = target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            dim_h = h.size(-1)
            h = torch.cat([torch.gather(h, 1, mk.unsqueeze(-1).repeat(1, 1, dim_h)) for mk in masks_pred])
            h = h.repeat_interleave(len(masks_enc), dim=0)
        z = pred(enc(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for param_q, param_k in zip(enc.parameters(), target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
    return step


def _contract_step(method, opt, batch: dict):
    """A method's full step on a fixed prepared ``batch``: the engine's own ``train_step``."""
    from visrep.engine.step import train_step
    from visrep.methods import Step

    def step(imgs, labels, masks_enc, masks_pred, i):
        train_step(method, batch, Step(step=i, epoch=0, total_steps=10_000, steps_per_epoch=1000), opt)
    return step


def _msn_views(args, device):
    """MSN inputs shared by both implementations: target and one anchor view at ``--img``,
    ``--focal-views`` focal views at ``--focal-size`` (seeded, so ours and the official see equal data)."""
    import torch

    g = torch.Generator().manual_seed(1)
    B, C = args.batch, args.in_chans
    target = torch.randn(B, C, args.img, args.img, generator=g).to(device)
    anchor = torch.randn(B, C, args.img, args.img, generator=g).to(device)
    focal = [torch.randn(B, C, args.focal_size, args.focal_size, generator=g).to(device)
             for _ in range(args.focal_views)]
    return target, anchor, focal


MSN_HEAD = {"hidden_dim": 2048, "output_dim": 256, "num_prototypes": 1024}  # official msn_vits16.yaml


def build_msn(args, device):
    """Our MSN step (``visrep.methods.msn``): target forward, masked anchor + focal views (one call per
    size), MSN loss with Sinkhorn and ME-MAX, backward, clipping, AdamW, EMA of encoder and head."""
    import torch

    from visrep.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from visrep.methods import DataInfo
    from visrep.methods.msn import MSN, MSNConfig
    from visrep.optim import build_optimizer, resolve_optim_defaults

    dim, depth, heads = SIZES[args.size]
    cfg = Config(method=MSNConfig(focal_views=args.focal_views, focal_size=args.focal_size, **MSN_HEAD),
                 data=DataConfig(image_size=args.img),
                 model=ModelConfig(patch_size=args.patch, embed_dim=dim, depth=depth, num_heads=heads,
                                   class_token=True, pos_embed="learned"),
                 optim=resolve_optim_defaults(OptimConfig(ipe_scale=1.25)), train=TrainConfig())
    info = DataInfo(in_chans=args.in_chans, image_size=args.img, num_classes=10, mean=(0.5,) * args.in_chans,
                    std=(0.5,) * args.in_chans)
    method = MSN(cfg, info).to(device)
    opt = build_optimizer(method.param_groups(), cfg.optim)
    target, anchor, focal = _msn_views(args, device)
    perm = torch.randperm(method.num_patches)[:method.keep].to(device)
    batch = {"target": target, "anchors": anchor[:, None], "focal": torch.stack(focal, 1),
             "idx_keep": perm.expand(args.batch, -1)}

    return _contract_step(method, opt, batch)


def build_official_msn(args, device):
    """The official MSN ``train_step`` (facebookresearch/msn ``src/msn_train.py``) on one process: its
    deit ViT + ``init_model`` head, ``init_msn_loss`` with Sinkhorn, prototype gradient AllReduceSum
    (identity on one process), ``grad_logger``, clipping, AdamW over ``init_opt``'s groups,
    per-parameter EMA."""
    import copy
    import itertools
    from functools import partial

    import torch

    if not args.official_msn or not Path(args.official_msn, "src", "msn_train.py").is_file():
        raise SystemExit("--official-msn must point to a checkout of facebookresearch/msn")
    sys.path.insert(0, str(Path(args.official_msn).resolve()))
    for mod in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[mod]
    from collections import OrderedDict

    import src.deit as deit
    from src.losses import init_msn_loss
    from src.utils import grad_logger, trunc_normal_

    dim, depth, heads = SIZES[args.size]
    enc = deit.VisionTransformer(img_size=[args.img], patch_size=args.patch, in_chans=args.in_chans,
                                 embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True,
                                 norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    hid, out = MSN_HEAD["hidden_dim"], MSN_HEAD["output_dim"]
    enc.fc = torch.nn.Sequential(OrderedDict([
        ("fc1", torch.nn.Linear(dim, hid)), ("bn1", torch.nn.BatchNorm1d(hid)), ("gelu1", torch.nn.GELU()),
        ("fc2", torch.nn.Linear(hid, hid)), ("bn2", torch.nn.BatchNorm1d(hid)), ("gelu2", torch.nn.GELU()),
        ("fc3", torch.nn.Linear(hid, out))]))
    for m in enc.modules():
        if isinstance(m, torch.nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            torch.nn.init.constant_(m.bias, 0)
    enc = enc.to(device)
    target = copy.deepcopy(enc)
    for p in target.parameters():
        p.requires_grad = False
    k = MSN_HEAD["num_prototypes"]
    prototypes = torch.nn.Parameter(torch.empty(k, out).uniform_(-(1 / out) ** 0.5, (1 / out) ** 0.5).to(device))
    proto_labels = torch.eye(k, device=device)
    msn = init_msn_loss(num_views=1 + args.focal_views, tau=0.1, me_max=True, return_preds=True)
    groups = [
        {"params": (p for n, p in enc.named_parameters() if ("bias" not in n) and ("bn" not in n) and p.ndim != 1)},
        {"params": (p for n, p in enc.named_parameters() if ("bias" in n) or ("bn" in n) or p.ndim == 1),
         "WD_exclude": True, "weight_decay": 0},
        {"params": [prototypes], "LARS_exclude": True, "WD_exclude": True, "weight_decay": 0}]
    opt = torch.optim.AdamW(groups)
    t_view, anchor, focal = _msn_views(args, device)
    imgs_all = [t_view, anchor] + focal
    momentum = itertools.count()

    def step(imgs, labels, masks_enc, masks_pred, i):
        opt.zero_grad()
        h, z = enc(imgs_all[1:], return_before_head=True, patch_drop=0.15)
        with torch.no_grad():
            h, _ = target(imgs_all[0], return_before_head=True)
        h, z = h.float(), z.float()
        ploss, me_max, ent, logs, _ = msn(T=0.25, use_sinkhorn=True, use_entropy=False, anchor_views=z,
                                          target_views=h.detach(), proto_labels=proto_labels,
                                          prototypes=prototypes)
        loss = ploss + 1.0 * me_max + 0.0 * ent
        loss.backward()
        grad_logger(enc.named_parameters())
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 3.0)
        opt.step()
        with torch.no_grad():
            m = 0.996 + 1e-6 * next(momentum)
            for param_q, param_k in zip(enc.parameters(), target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return float(loss)
    return step


def _paws_views(args, device):
    """PAWS inputs shared by both implementations (CIFAR shapes: 3 channels, 32 px large views, 18 px
    multi-crops): ``--batch`` unlabelled images in 2 large + 6 small views, 10 classes x
    ``--batch // 4`` supports in 2 views."""
    import torch

    g = torch.Generator().manual_seed(2)
    B, S = args.batch, 10 * max(1, args.batch // 4)
    sup = [torch.randn(S, 3, 32, 32, generator=g).to(device) for _ in range(2)]
    large = [torch.randn(B, 3, 32, 32, generator=g).to(device) for _ in range(2)]
    small = [torch.randn(B, 3, 18, 18, generator=g).to(device) for _ in range(6)]
    labels = torch.arange(10).repeat_interleave(S // 10).to(device)
    return sup, large, small, labels


def build_paws(args, device):
    """Our PAWS step (``visrep.methods.paws``, WRN-28-2 as the official CIFAR-10 setting): supports and
    large views in one call, multi-crops in a second, PAWS loss, backward, LARS(SGD)."""
    import torch

    from visrep.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from visrep.methods import DataInfo
    from visrep.methods.paws import PAWS, PAWSConfig
    from visrep.optim import build_optimizer, resolve_optim_defaults

    sup, large, small, labels = _paws_views(args, device)
    cfg = Config(method=PAWSConfig(backbone="wrn28_2", hidden_dim=128, output_dim=128, classes_per_batch=10,
                                   supports_per_class=len(labels) // 10),
                 data=DataConfig(name="cifar10", image_size=32), model=ModelConfig(),
                 optim=resolve_optim_defaults(OptimConfig(name="lars", lr=3.2, momentum=0.9, weight_decay=1e-6)),
                 train=TrainConfig())
    info = DataInfo(in_chans=3, image_size=32, num_classes=10, mean=(0.5,) * 3, std=(0.5,) * 3)
    method = PAWS(cfg, info).to(device)
    opt = build_optimizer(method.param_groups(), cfg.optim)
    batch = {"supports": {"views": torch.stack(sup, 1), "label": labels},
             "large": torch.stack(large, 1), "small": torch.stack(small, 1)}

    return _contract_step(method, opt, batch)


def build_official_paws(args, device):
    """The official PAWS ``train_step`` (facebookresearch/suncet ``src/paws_train.py``) on one process:
    its WRN-28-2 + ``init_model`` head, one forward over [supports, large, small] (grouped by size),
    ``init_paws_loss``, LARS around SGD (momentum 0.9, ``init_opt`` groups)."""
    from collections import OrderedDict

    import torch

    if not args.official_paws or not Path(args.official_paws, "src", "paws_train.py").is_file():
        raise SystemExit("--official-paws must point to a checkout of facebookresearch/suncet")
    sys.path.insert(0, str(Path(args.official_paws).resolve()))
    for mod in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
        del sys.modules[mod]
    import src.wide_resnet as wide_resnet
    from src.lars import LARS
    from src.losses import init_paws_loss
    from src.sgd import SGD

    enc = wide_resnet.wide_resnet28w2(dropout_rate=0.0)
    enc.fc = torch.nn.Sequential(OrderedDict([
        ("fc1", torch.nn.Linear(128, 128)), ("bn1", torch.nn.BatchNorm1d(128)), ("relu1", torch.nn.ReLU(inplace=True)),
        ("fc2", torch.nn.Linear(128, 128)), ("bn2", torch.nn.BatchNorm1d(128)), ("relu2", torch.nn.ReLU(inplace=True)),
        ("fc3", torch.nn.Linear(128, 128))]))
    enc.pred = None
    enc = enc.to(device)
    groups = [{"params": (p for n, p in enc.named_parameters() if ("bias" not in n) and ("bn" not in n))},
              {"params": (p for n, p in enc.named_parameters() if ("bias" in n) or ("bn" in n)),
               "LARS_exclude": True, "weight_decay": 0}]
    opt = LARS(SGD(groups, weight_decay=1e-6, momentum=0.9, nesterov=False, lr=3.2), trust_coefficient=0.001)
    paws = init_paws_loss(multicrop=6, tau=0.1, T=0.25, me_max=True)
    sup, large, small, labels = _paws_views(args, device)
    onehot = torch.full((len(labels), 10), 0.1 / 10, device=device).scatter_(1, labels[:, None], 1 - 0.1 + 0.01)
    onehot = torch.cat([onehot, onehot])
    imgs_all = sup + large + small
    num_support, B = 2 * len(labels), args.batch

    def step(imgs, lab, masks_enc, masks_pred, i):
        opt.zero_grad()
        h, z = enc(imgs_all, return_before_head=True)
        h, z = h.float(), z.float()
        target_views = h[num_support:].detach()
        target_views = torch.cat([target_views[B:2 * B], target_views[:B]], dim=0)
        ploss, me_max = paws(anchor_views=z[num_support:], anchor_supports=z[:num_support],
                             anchor_support_labels=onehot, target_views=target_views,
                             target_supports=h[:num_support].detach(), target_support_labels=onehot)
        loss = ploss + me_max
        loss.backward()
        opt.step()
        return float(loss)
    return step


BUILDERS = {"visrep": build_visrep, "supervised": build_supervised, "official": build_official,
            "stop": lambda args, device: build_visrep(args, device, "stop"), "official-stop": build_official_stop,
            "msn": build_msn, "official-msn": build_official_msn,
            "paws": build_paws, "official-paws": build_official_paws}


def run_variant(args) -> dict:
    import contextlib

    import torch

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = BUILDERS[args.variant](args, device)
    masks_enc, masks_pred = _masks(args, seed=0)
    masks_enc = [m.to(device) for m in masks_enc]
    masks_pred = [m.to(device) for m in masks_pred]
    imgs = torch.randn(args.batch, args.in_chans, args.img, args.img, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with amp:
        for i in range(args.warmup):
            step(imgs, labels, masks_enc, masks_pred, i)
        _sync(device)
        times = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            step(imgs, labels, masks_enc, masks_pred, args.warmup + i)
            _sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)  # matmul / conv / attention FLOPs of one step, fwd + bwd
    with amp, counter:
        step(imgs, labels, masks_enc, masks_pred, args.warmup + args.steps)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (KiB -> MiB)
    return {"variant": args.variant, "bf16": args.bf16, "ms_per_step": med * 1000, "images_per_sec": args.batch / med,
            "peak_mb": peak_mb, "rss_before_mb": rss0 / 1024, "flops_per_step": counter.get_total_flops()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="mini", choices=sorted(SIZES))
    ap.add_argument("--img", type=int, default=28)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pred-dim", type=int, default=64)
    ap.add_argument("--pred-depth", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--official", default=os.environ.get("IJEPA_OFFICIAL"), help="checkout of facebookresearch/ijepa")
    ap.add_argument("--official-stop", default=os.environ.get("STOP_OFFICIAL"), help="checkout of amirbar/StoP")
    ap.add_argument("--official-msn", default=os.environ.get("MSN_OFFICIAL"), help="checkout of facebookresearch/msn")
    ap.add_argument("--official-paws", default=os.environ.get("PAWS_OFFICIAL"),
                    help="checkout of facebookresearch/suncet")
    ap.add_argument("--focal-views", type=int, default=4, help="MSN: focal views per image")
    ap.add_argument("--focal-size", type=int, default=12, help="MSN: focal view size in px")
    ap.add_argument("--compile", action="store_true", help="torch.compile our training step")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak dense TFLOP/s (H100/H200 bf16: 989); adds model FLOPs utilisation")
    ap.add_argument("--grad-checkpointing", action="store_true",
                    help="activation checkpointing in our encoder and predictor (model.grad_checkpointing)")
    ap.add_argument("--variants", default=None, help="comma list (default: visrep,supervised[,official])")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the variants this many times; report the best")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.variant:  # child process
        print(json.dumps(run_variant(args)))
        return

    variants = (args.variants.split(",") if args.variants
                else ["visrep", "supervised"] + (["official"] if args.official else []))
    precisions = [False, True] if args.device.startswith("cuda") else [False]
    rows = []
    for bf16 in precisions:
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for v in variants:
                cmd = [sys.executable, __file__, "--variant", v] + [a for a in sys.argv[1:] if a != "--bf16"]
                if bf16:
                    cmd.append("--bf16")
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    raise SystemExit(f"variant {v} failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                if v not in best or res["images_per_sec"] > best[v]["images_per_sec"]:
                    best[v] = res
        rows += list(best.values())

    dim, depth, heads = SIZES[args.size]
    where = f"device {args.device}, threads {args.threads or 'default'}"
    if set(variants) & {"visrep", "supervised", "official", "stop", "official-stop"}:
        print(f"\nI-JEPA / StoP train step, ViT-{args.size} ({dim}x{depth}, {heads} heads), {args.img}px / patch "
              f"{args.patch}, batch {args.batch}, predictor {args.pred_dim}x{args.pred_depth}, {where}")
    if set(variants) & {"msn", "official-msn"}:
        print(f"\nMSN train step, ViT-{args.size} ({dim}x{depth}), batch {args.batch}: target + 1 masked anchor "
              f"({args.img}px / patch {args.patch}, 15 % dropped) + {args.focal_views} focal views of "
              f"{args.focal_size}px, head {MSN_HEAD}, {where}")
    if set(variants) & {"paws", "official-paws"}:
        print(f"\nPAWS train step, WRN-28-2, CIFAR shapes: {args.batch} unlabelled x (2 x 32px + 6 x 18px), "
              f"10 x {max(1, args.batch // 4)} supports x 2 views, LARS, {where}")
    print()
    # MFU counts the FLOPs our step needs (our count beside an official row), so redundant work
    # elsewhere is not credited as utilisation
    ours_of = {"official": "visrep", "official-stop": "stop", "official-msn": "msn", "official-paws": "paws"}
    model_flops = {(r["variant"], r["bf16"]): r["flops_per_step"] for r in rows}
    print("| variant | precision | images/s | ms/step | peak MB | GFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        prec = "bf16" if r["bf16"] else "fp32"
        flops = model_flops.get((ours_of.get(r["variant"], r["variant"]), r["bf16"]), r["flops_per_step"])
        r["mfu"] = (flops / (r["ms_per_step"] / 1000) / (args.peak_tflops * 1e12)) if args.peak_tflops else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['variant']} | {prec} | {r['images_per_sec']:.1f} | {r['ms_per_step']:.1f} | {r['peak_mb']:.0f} "
              f"| {r['flops_per_step'] / 1e9:.1f} | {mfu} |")
    ratios = {}
    for bf16 in precisions:
        by = {r["variant"]: r for r in rows if r["bf16"] == bf16}
        for ours, base in (("visrep", "official"), ("visrep", "supervised"), ("stop", "official-stop"),
                           ("msn", "official-msn"), ("paws", "official-paws")):
            if ours in by and base in by:
                key = f"{ours}/{base} ({'bf16' if bf16 else 'fp32'})"
                ratios[key] = {"throughput": by[ours]["images_per_sec"] / by[base]["images_per_sec"],
                               "peak_memory": by[ours]["peak_mb"] / by[base]["peak_mb"]}
    print()
    for k, v in ratios.items():
        print(f"{k}: throughput x{v['throughput']:.2f}, peak memory x{v['peak_memory']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios}, indent=2))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
