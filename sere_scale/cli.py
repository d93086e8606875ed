"""``sere-scale`` command line: train, knn (and the commands added by later modules)."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sere-scale", description="SERE self-supervised ViT pretraining")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("train", help="pretrain (one process, or DDP/FSDP/DeepSpeed under a launcher)")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    p = sub.add_parser("knn", help="k-NN evaluation of a checkpoint's teacher backbone")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--train-data", required=True, help="image folder of labelled training images")
    p.add_argument("--val-data", required=True, help="image folder of labelled validation images")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--random-init", action="store_true", help="evaluate the backbone at random init instead")

    args = parser.parse_args(argv)
    try:
        if args.cmd == "train":
            from .train import main_train
            cfg = load_config(args.config, args.overrides)
            return main_train(cfg, args.resume)
        if args.cmd == "knn":
            from .eval.knn import knn_main
            return knn_main(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
