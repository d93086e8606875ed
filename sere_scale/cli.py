"""``sere-scale`` command line. Each sub-command lives in its own module exposing ``add_parser(subparsers)``
(which sets ``func`` on its parser) — add a module path to ``COMMANDS`` to register one."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sere_scale import __version__
from sere_scale.config.load import ConfigError

COMMANDS = [
    "sere_scale.commands.train",
    "sere_scale.commands.knn",
    "sere_scale.commands.profile",
    "sere_scale.commands.visualize",
    "sere_scale.commands.invariance",
    "sere_scale.commands.linear",
    "sere_scale.commands.export",
    "sere_scale.commands.config",
    "sere_scale.commands.demo",
    "sere_scale.commands.segprobe",
    "sere_scale.commands.davis",
    "sere_scale.commands.plan",
]


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", action="append", default=[],
                   help="YAML config file (configs/*.yaml); repeat to merge several in order (later wins)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")


def strip_local_rank(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local-rank N`` wherever a launcher put it (the ``deepspeed`` launcher
    inserts it before our arguments; ``torch.distributed.launch`` too). The rank is taken from the environment
    (``LOCAL_RANK``), which is set from the argument when the launcher did not set it."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 2
            continue
        if a.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            i += 1
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sere-scale", description="SERE self-supervised ViT pretraining")
    parser.add_argument("--version", action="version", version=f"sere-scale {__version__}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for mod in COMMANDS:
        importlib.import_module(mod).add_parser(sub)
    args = parser.parse_args(strip_local_rank(sys.argv[1:] if argv is None else list(argv)))
    # INFO on stderr: e.g. which checkpoint (step) a command read, and warnings about skipped damaged ones
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from sere_scale.engine.checkpoint import DamagedCheckpoint, NoLoadableCheckpoint
        if isinstance(e, (DamagedCheckpoint, NoLoadableCheckpoint)):  # named, with what to do
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
