"""Command line: ``visrep pretrain | eval | export | demo``.

    visrep pretrain configs/ijepa/fashion_mnist_vit_tiny.yaml train.epochs=20 optim.lr=5e-4
    torchrun --nproc-per-node 8 -m visrep pretrain configs/ijepa/imagenet_vit_h14.yaml
    visrep eval runs/ijepa-fmnist/last.pt --protocols knn,linear,lowshot
    visrep export runs/ijepa-fmnist/last.pt encoder.safetensors
    visrep demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visrep.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def resolve_config(name: str) -> Path:
    """A path, or a name under the packaged ``visrep/configs`` (``ijepa/fashion_mnist_demo``)."""
    p = Path(name)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if cand.is_file():
            return cand
    available = sorted(str(c.relative_to(CONFIG_DIR)) for c in CONFIG_DIR.rglob("*.yaml"))
    raise ConfigError(f"config {name!r} not found; give a YAML path or one of: {', '.join(available)}")


def cmd_pretrain(args) -> int:
    from visrep.config import load_config
    from visrep.runner import pretrain

    cfg = load_config(resolve_config(args.config), args.overrides)
    pretrain(cfg, resume=args.resume)
    return 0


def cmd_eval(args) -> int:
    from visrep.runner import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoints, protocols=args.protocols.split(","), out_dir=args.out,
                        data_root=args.data_root, include_raw=args.raw_pixels, overrides=args.overrides)
    return 0


def cmd_export(args) -> int:
    from visrep.runner import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, which=args.which)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from visrep.runner import demo

    demo(minutes=args.minutes, out_dir=args.out, data_root=args.data_root, overrides=args.overrides,
         recipe=resolve_config(args.recipe))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visrep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a method from a YAML config")
    p.add_argument("config", help="YAML path or packaged config name (e.g. ijepa/fashion_mnist_demo)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=5e-4 train.epochs=20")
    p.add_argument("--resume", action="store_true", help="continue from <train.out_dir>/last.pt exactly")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("eval", help="evaluate checkpoints with frozen-feature protocols")
    p.add_argument("checkpoints", nargs="+", help="one or more checkpoints (compared side by side)")
    p.add_argument("--protocols", default="knn,linear,lowshot",
                   help="comma list of knn,linear,lowshot and, for world models (IWM), mrr; for "
                        "vision-language models (CLIP, SigLIP, Llip), zeroshot,retrieval")
    p.add_argument("--out", default=None,
                   help="folder for results.md / results.json (default: next to the first checkpoint)")
    p.add_argument("--data-root", default=None, help="dataset folder (overrides data.root)")
    p.add_argument("--raw-pixels", action="store_true", help="add raw pixels as a baseline column")
    p.add_argument("--set", dest="overrides", nargs="*", default=[],
                   help="config overrides (e.g. eval.linear_epochs=10)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export an encoder as safetensors (official key names)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--which", default=None,
                   help="module to export (default: the method's first, e.g. I-JEPA's target_encoder; "
                        "I-JEPA also has encoder, predictor)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="pretrain I-JEPA on Fashion-MNIST on CPU, then evaluate vs random init and "
                                    "raw pixels")
    p.add_argument("--minutes", type=float, default=10.0, help="pretraining budget in minutes (default 10)")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--recipe", default="ijepa/fashion_mnist_demo",
                   help="packaged config or YAML to pretrain (e.g. stop/fashion_mnist)")
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("overrides", nargs="*", help="config overrides for the demo recipe")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from visrep.engine import CheckpointError, NonFiniteLossError, ResumeError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"visrep: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"visrep: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ResumeError, NonFiniteLossError) as e:
        print(f"visrep: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("visrep: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
