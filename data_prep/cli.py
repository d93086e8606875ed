"""``sere-prep``: ImageNet → WebDataset shards (``imagenet``), ``merge`` of array-task output, ``verify``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .convert import ConvertOptions, convert, finalize
from .imagecheck import CHECKS
from .plan import PlanMismatch
from .source import SourceError
from .verify import verify


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else default


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sere-prep", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("imagenet", help="convert SRC/<split> into tar shards in OUT (resumable)")
    im.add_argument("src", help="ImageNet-style tree: SRC/train/<wnid>/*.JPEG, SRC/val/...")
    im.add_argument("out", help="output folder for shards, _info.json, _report-<split>.json")
    im.add_argument("--split", default="train", help="sub-folder of SRC to convert (default: train)")
    im.add_argument("--split-name", default=None,
                    help="name of the written split (default: --split); timm's ImageNet shards name the "
                         "validation split 'validation' (then: --split val --split-name validation)")
    im.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    im.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    im.add_argument("--seed", type=int, default=0, help="seed of the shuffle assigning images to shards")
    im.add_argument("--check", choices=CHECKS, default="scan",
                    help="how kept JPEGs are checked to decode (default: scan; see docs/DATA.md)")
    im.add_argument("--labels", help="label file for a flat val/ folder (name wnid per line, or Kaggle CSV)")
    im.add_argument("--prefix", default="imagenet", help="shard name prefix (default: imagenet)")
    im.add_argument("--task-index", type=int, default=_env_int("SLURM_ARRAY_TASK_ID", 0),
                    help="this task's index for array jobs (default: $SLURM_ARRAY_TASK_ID or 0)")
    im.add_argument("--num-tasks", type=int, default=_env_int("SLURM_ARRAY_TASK_COUNT", 1),
                    help="number of array tasks; task t writes shards t, t+T, ... (default: "
                         "$SLURM_ARRAY_TASK_COUNT or 1)")
    im.add_argument("--plan-only", action="store_true",
                    help="only list SRC and write the shard plan (run once before an array job)")
    im.add_argument("--no-fsync", action="store_true", help="skip fsync of finished shards")
    im.add_argument("--quiet", action="store_true", help="no progress display")
    mg = sub.add_parser("merge", help="write _info.json and the report once all array tasks are done")
    mg.add_argument("out")
    mg.add_argument("--split", default="train", help="the written split's name (--split-name if given)")
    vf = sub.add_parser("verify", help="check every shard opens and the counts match _info.json")
    vf.add_argument("out")
    vf.add_argument("--split", default=None, help="only this split (default: all)")
    vf.add_argument("--decode", action="store_true", help="also decode every image fully")
    vf.add_argument("--workers", type=int, default=1)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.cmd == "imagenet":
            summary = convert(ConvertOptions(
                args.src, args.out, args.split_name or args.split, args.shard_size, args.workers, args.seed,
                args.check, args.labels, args.prefix, args.task_index, args.num_tasks, fsync=not args.no_fsync,
                progress=not args.quiet, plan_only=args.plan_only, source_split=args.split))
            print(json.dumps(summary))
            return 0
        if args.cmd == "merge":
            print(json.dumps(finalize(args.out, args.split)))
            return 0
        counts, problems = verify(args.out, args.split, args.decode, args.workers)
        for p in problems:
            print(f"PROBLEM: {p}", file=sys.stderr)
        print(json.dumps({"ok": not problems, "samples": counts, "problems": len(problems)}))
        return 0 if not problems else 1
    except (SourceError, PlanMismatch, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"sere-prep: error: {e}", file=sys.stderr)
        return 2
