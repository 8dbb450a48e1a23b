"""Command line: ``visrep pretrain | eval | export | sample | demo | curate``.

    visrep pretrain <method>/<recipe> train.epochs=20 optim.lr=5e-4      (packaged name or YAML path)
    torchrun --nproc-per-node 8 -m visrep pretrain <method>/<recipe> data.root=/data
    torchrun --nproc-per-node 8 -m visrep pretrain <method>/<recipe> train.parallel=fsdp        (FSDP2)
    visrep eval runs/<run>/last.pt --protocols knn,linear,lowshot
    visrep export runs/<run>/last.pt encoder.safetensors
    visrep sample runs/<run>/last.pt --n 64 --out grid.png --labels 0,1,2 --guidance 2
    visrep demo
"""
from __future__ import annotations

import argparse
import sys

from visrep.config import ConfigError, resolve_config


def cmd_pretrain(args) -> int:
    from visrep.config import load_config
    from visrep.runner import pretrain

    cfg = load_config(resolve_config(args.config), args.overrides)
    pretrain(cfg, resume=args.resume, force=args.force)
    return 0


def cmd_eval(args) -> int:
    from visrep.runner import evaluate_checkpoint, known_protocols

    if args.list_protocols:
        for name, about in known_protocols().items():
            print(f"{name:14s} {about}")
        return 0
    if not args.checkpoints:
        raise SystemExit("visrep eval: give one or more checkpoints (or --list-protocols)")
    evaluate_checkpoint(args.checkpoints, protocols=args.protocols.split(","), out_dir=args.out,
                        data_root=args.data_root, include_raw=args.raw_pixels, overrides=args.overrides)
    return 0


def cmd_export(args) -> int:
    from visrep.runner import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, which=args.which, fmt=args.format, heads=args.heads)
    print(f"wrote {path}")
    return 0


def cmd_sample(args) -> int:
    from visrep.runner import sample_checkpoint

    path = sample_checkpoint(args.checkpoint, args.out, n=args.n, labels=args.labels, seed=args.seed,
                             steps=args.steps, guidance=args.guidance, sampler=args.sampler, nrow=args.nrow)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from visrep.runner import demo

    demo(minutes=args.minutes, out_dir=args.out, data_root=args.data_root, overrides=args.overrides,
         recipe=resolve_config(args.recipe))
    return 0


def cmd_bench(args) -> int:
    from visrep.bench import bench

    bench(args.recipes or None, minutes=args.minutes, steps=args.steps, out_dir=args.out, overrides=args.overrides,
          data_root=args.data_root, readme=args.readme, rerun=args.rerun)
    return 0


def cmd_curate(args) -> int:
    from visrep.curate import curate_checkpoint

    result = curate_checkpoint(args.checkpoint, args.out, overrides=args.overrides, seeds_file=args.seeds,
                               dedup_threshold=None if args.dedup <= 0 else args.dedup, retrieval_k=args.retrieval_k,
                               size=args.size, n_clusters=args.clusters, levels=args.levels, seed=args.seed)
    print(result.report())
    print(f"wrote {len(result.indices)} entries to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visrep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a method from a YAML config")
    p.add_argument("config", help="YAML path or packaged config name (<method>/<recipe>, see visrep/configs)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=5e-4 train.epochs=20")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/last.pt exactly (optim.lr "
                   "and the other optimisation settings may change: visrep/engine/resume.py)")
    p.add_argument("--force", action="store_true", help="start over in a train.out_dir that holds a run: its "
                   "last.pt, config.yaml, metrics.jsonl and tb/ move into <out_dir>/replaced-<time>/")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate checkpoints with frozen-feature protocols")
    p.add_argument("checkpoints", nargs="*", help="one or more checkpoints (compared side by side)")
    p.add_argument("--protocols", default="knn,linear,lowshot",
                   help="comma list: the frozen-feature protocols knn, linear, lowshot, and any protocol the "
                        "method answers (`visrep eval --list-protocols` lists them all with what they measure); "
                        "side by side, a method that does not answer one is reported n/a")
    p.add_argument("--list-protocols", action="store_true", help="list every protocol and exit")
    p.add_argument("--out", default=None,
                   help="folder for results.md / results.json (default: next to the first checkpoint)")
    p.add_argument("--data-root", default=None, help="dataset folder (overrides data.root)")
    p.add_argument("--raw-pixels", action="store_true", help="add raw pixels as a baseline column")
    p.add_argument("--set", dest="overrides", nargs="*", default=[],
                   help="config overrides (e.g. eval.linear_epochs=10)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export an encoder as safetensors (official key names)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="output path: a .safetensors file (visrep), a .pth / .safetensors file (official), "
                                "a folder (timm, open_clip)")
    p.add_argument("--which", default=None,
                   help="module to export (default: the first of the method's export_modules(); an unknown "
                        "name lists the others)")
    p.add_argument("--format", default="visrep", choices=["visrep", "official", "timm", "open_clip"],
                   help="layout: visrep (ours, rebuilt by visrep.hub.load_exported), official (the method's "
                        "official code), timm (timm.create_model('local-dir:OUT')), open_clip "
                        "(open_clip.create_model_and_transforms('local-dir:OUT')); a method lacking one names its own")
    p.add_argument("--heads", action="store_true",
                   help="official layout with the heads / prototypes (MSN: projection head + prototypes; "
                        "DINOv2: dino_head / ibot_head in teacher_checkpoint.pth's layout)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="write a PNG grid of samples of a generative checkpoint (diffusion)")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--out", default="samples.png", help="PNG file to write")
    p.add_argument("--labels", default=None,
                   help="comma list of class ids or names, repeated to --n (default: drawn at random)")
    p.add_argument("--seed", type=int, default=0, help="the samples are a function of the seed")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1: none)")
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="default: the recipe's")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: about sqrt(n))")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="pretrain I-JEPA on Fashion-MNIST on CPU, then evaluate vs random init and "
                                    "raw pixels")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining budget in minutes (default 10)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--recipe", default="ijepa/fashion_mnist_demo",
                   help="packaged config or YAML to pretrain (e.g. stop/fashion_mnist)")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("overrides", nargs="*", help="config overrides for the demo recipe")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="every packaged CPU recipe (or the ones named) at one equal budget, evaluated "
                                     "with its own protocols and features, in one table (resumable)")
    p.add_argument("recipes", nargs="*", help="recipes to run (default: every configs/<method>/fashion_mnist*)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="pretraining budget of each recipe (schedules fitted to it)")
    budget.add_argument("--steps", type=int, help="pretraining steps of each recipe")
    p.add_argument("--out", default="runs/bench", help="output folder (finished runs in it are reused)")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every recipe")
    p.add_argument("--readme", default=None, help="also write the table into this Markdown file, between its "
                                                  "'<!-- bench:start -->' and '<!-- bench:end -->' lines")
    p.add_argument("--rerun", nargs="+", default=[], metavar="RECIPE",
                   help="run these recipes again even where a finished run would be reused (after a change to "
                        "their evaluation, which the reuse check does not see)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("curate", help="deduplicate / retrieve / cluster-balance a training set; write a file list "
                                      "for data.subset_file")
    p.add_argument("checkpoint", help="training checkpoint whose method embeds the images, or 'raw' (pixels)")
    p.add_argument("--out", required=True, help="file list to write (one dataset index or path per line)")
    p.add_argument("--dedup", type=float, default=0.95, help="cosine threshold of near duplicates (<= 0: off)")
    p.add_argument("--seeds", default=None, help="file list of curated seed images: keep their neighbours")
    p.add_argument("--retrieval-k", type=int, default=100, help="neighbours kept per seed image")
    p.add_argument("--size", type=int, default=None, help="images to keep, balanced over k-means clusters")
    p.add_argument("--clusters", type=int, default=100, help="k-means clusters for the balanced sampling")
    p.add_argument("--levels", type=int, default=1, choices=(1, 2), help="2: hierarchical k-means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides, e.g. data.root=...")
    p.set_defaults(func=cmd_curate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from visrep.engine import CheckpointError, NonFiniteLossError, ResumeError
    from visrep.errors import RunDirectoryError, WriteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"visrep: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"visrep: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ResumeError, NonFiniteLossError, RunDirectoryError, WriteError) as e:
        print(f"visrep: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("visrep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
