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
        loss = method.training_step(batch, info)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_optimizer_step(info)
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


BUILDERS = {"visrep": build_visrep, "supervised": build_supervised, "official": build_official,
            "stop": lambda args, device: build_visrep(args, device, "stop"), "official-stop": build_official_stop}


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
    print(f"\nI-JEPA train step, ViT-{args.size} ({dim}x{depth}, {heads} heads), {args.img}px / patch {args.patch}, "
          f"batch {args.batch}, predictor {args.pred_dim}x{args.pred_depth}, device {args.device}, threads "
          f"{args.threads or 'default'}\n")
    # MFU counts the FLOPs our step needs (visrep's count where measured), so redundant work elsewhere
    # is not credited as utilisation
    model_flops = {r["bf16"]: r["flops_per_step"] for r in rows if r["variant"] in ("visrep", "stop")}
    print("| variant | precision | images/s | ms/step | peak MB | GFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        prec = "bf16" if r["bf16"] else "fp32"
        flops = model_flops.get(r["bf16"], r["flops_per_step"])
        r["mfu"] = (flops / (r["ms_per_step"] / 1000) / (args.peak_tflops * 1e12)) if args.peak_tflops else None
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['variant']} | {prec} | {r['images_per_sec']:.1f} | {r['ms_per_step']:.1f} | {r['peak_mb']:.0f} "
              f"| {r['flops_per_step'] / 1e9:.1f} | {mfu} |")
    ratios = {}
    for bf16 in precisions:
        by = {r["variant"]: r for r in rows if r["bf16"] == bf16}
        for ours, base in (("visrep", "official"), ("visrep", "supervised"), ("stop", "official-stop")):
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
