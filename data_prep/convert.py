"""Convert one split of an ImageNet-style tree into WebDataset shards: parallel, resumable, deterministic.

Per shard ``S`` (see docs/DATA.md): the tar is written as ``S.tmp-<pid>`` and renamed to ``S`` once complete;
then its record ``_parts-<split>/S.json`` (sample count, bytes, rejected and re-encoded inputs) is written the
same way. A shard counts as done when its record exists and the tar matches it (size and sample count); a rerun
of the same command converts only the shards that are not done. When every shard of the plan is done,
``_info.json`` (timm's layout) and ``_report-<split>.json`` are written from the records.
"""
from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing as mp
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .imagecheck import CHECKS, prepare_image
from .plan import Plan, PlanMismatch, atomic_write_text, load_plan, make_plan, plan_for, plan_path
from .progress import Progress
from .source import list_split
from .tarwrite import ShardTarWriter, count_tar_samples

log = logging.getLogger("sere-prep")
STALL_ENV = "SERE_PREP_STALL_AFTER_SHARDS"  # test hook: stall (sleep) inside the next shard after N shards


@dataclass
class ConvertOptions:
    src: str
    out: str
    split: str = "train"  # the written split's name (shard names, _info.json, reports)
    shard_size: int = 1000
    workers: int = 1
    seed: int = 0
    check: str = "scan"
    labels: str | None = None
    prefix: str = "imagenet"
    task_index: int = 0
    num_tasks: int = 1
    fsync: bool = True
    progress: bool = True
    plan_only: bool = False
    source_split: str = ""  # sub-folder of src to read (default: split)


def parts_dir(out: str | os.PathLike, split: str) -> Path:
    return Path(out) / f"_parts-{split}"


def record_path(out, plan: Plan, i: int) -> Path:
    return parts_dir(out, plan.split) / f"{plan.shard_name(i)}.json"


def shard_done(out, plan: Plan, i: int) -> bool:
    """True if shard ``i`` and its record exist and agree (size, sample and member counts)."""
    rec_p, tar_p = record_path(out, plan, i), Path(out) / plan.shard_name(i)
    if not rec_p.exists() or not tar_p.exists():
        return False
    try:
        rec = json.loads(rec_p.read_text())
        if tar_p.stat().st_size != rec["bytes"]:
            raise ValueError(f"size {tar_p.stat().st_size} != recorded {rec['bytes']}")
        if count_tar_samples(tar_p) != (rec["count"], 3 * rec["count"]):
            raise ValueError("sample count differs from its record")
        return True
    except Exception as e:  # noqa: BLE001
        log.warning("redoing shard %s: %s", tar_p.name, e)
        return False


# ---- worker side ---------------------------------------------------------------------------------------------
_W: dict = {}  # per-process state: plan, options, counter, shards done (set before fork / in the initializer)


def _init_worker(counter) -> None:
    _W["counter"] = counter
    _W["done"] = 0


def _bump(n: int) -> None:
    c = _W.get("counter")
    if c is not None:
        with c.get_lock():
            c.value += n


def convert_shard(i: int) -> dict:
    plan: Plan = _W["plan"]
    opts: ConvertOptions = _W["opts"]
    stall_after = int(os.environ.get(STALL_ENV, "-1"))
    stall = 0 <= stall_after <= _W.get("done", 0)
    writer = ShardTarWriter(Path(opts.out) / plan.shard_name(i), fsync=opts.fsync)
    corrupt, reencoded, pending = [], [], 0
    try:
        for n, idx in enumerate(plan.shards[i]):
            rel, label = plan.inputs[idx]
            try:
                with open(os.path.join(opts.src, rel), "rb") as f:
                    raw = f.read()
            except OSError as e:
                raw, err = None, f"cannot read: {e}"
            if raw is None:
                corrupt.append([idx, rel, err])
            else:
                p = prepare_image(raw, opts.check)
                if p.data is None:
                    corrupt.append([idx, rel, p.error])
                else:
                    if p.reencoded:
                        reencoded.append([idx, rel, p.reencoded])
                    meta = {"wnid": plan.classes[label], "label": label, "path": rel, "width": p.width,
                            "height": p.height}
                    writer.add(f"{idx:08d}", {"jpg": p.data, "cls": str(label).encode(),
                                              "json": json.dumps(meta, sort_keys=True).encode()})
            pending += 1
            if pending >= 16:
                _bump(pending)
                pending = 0
            if stall and n >= len(plan.shards[i]) // 2:
                writer._f.flush()
                time.sleep(3600)
        size = writer.commit()
    except BaseException:
        writer.abort()
        raise
    _bump(pending)
    rec = {"name": plan.shard_name(i), "index": i, "count": writer.count, "bytes": size,
           "inputs": len(plan.shards[i]), "corrupt": corrupt, "reencoded": reencoded}
    rp = record_path(opts.out, plan, i)
    atomic_write_text(rp, json.dumps(rec), fsync=opts.fsync)
    _W["done"] = _W.get("done", 0) + 1
    return rec


def stored_plan(out: Path, opts: ConvertOptions) -> Plan:
    plan = load_plan(out, opts.split)
    want = {"seed": opts.seed, "shard_size": opts.shard_size, "prefix": opts.prefix}
    have = {"seed": plan.seed, "shard_size": plan.shard_size, "prefix": plan.prefix}
    if want != have:
        raise PlanMismatch(f"{plan_path(out, opts.split)} was made with {have}, this task asks for {want}")
    return plan


# ---- driver ----------------------------------------------------------------------------------------------------
def _remove_stale_tmp(folders: list[Path], names: set[str]) -> None:
    """Delete ``NAME.tmp-<pid>`` leftovers of a killed run, for this task's shards only."""
    for d in folders:
        for p in d.iterdir():
            base, sep, _ = p.name.partition(".tmp-")
            if sep and base in names:
                p.unlink(missing_ok=True)


def convert(opts: ConvertOptions) -> dict:
    """Convert (or finish converting) this task's shards; returns a summary dict."""
    if opts.check not in CHECKS:
        raise ValueError(f"--check must be one of {', '.join(CHECKS)}")
    if not 0 <= opts.task_index < opts.num_tasks:
        raise ValueError(f"--task-index {opts.task_index} is not in [0, --num-tasks {opts.num_tasks})")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    parts_dir(out, opts.split).mkdir(exist_ok=True)
    if opts.num_tasks > 1 and plan_path(out, opts.split).exists():
        plan = stored_plan(out, opts)  # array tasks: no re-listing of SRC by every task
    else:
        items, classes = list_split(opts.src, opts.source_split or opts.split, opts.labels)
        plan = plan_for(out, make_plan(items, classes, opts.split, opts.seed, opts.shard_size, opts.prefix))
    if opts.plan_only:
        return {"split": opts.split, "plan": str(plan_path(out, opts.split)), "num_inputs": len(plan.inputs),
                "num_shards": plan.num_shards}
    mine = [i for i in range(plan.num_shards) if i % opts.num_tasks == opts.task_index]
    _remove_stale_tmp([out, parts_dir(out, opts.split)],
                      {plan.shard_name(i) for i in mine} | {f"{plan.shard_name(i)}.json" for i in mine})
    todo = [i for i in mine if not shard_done(out, plan, i)]
    n_todo = sum(len(plan.shards[i]) for i in todo)
    log.info("%s: %d inputs in %d shards; this task owns %d shards, %d to convert (%d images)",
             opts.split, len(plan.inputs), plan.num_shards, len(mine), len(todo), n_todo)
    t0 = time.perf_counter()
    _W.update(plan=plan, opts=opts)
    bar = Progress(n_todo, f"sere-prep {opts.split}", enabled=opts.progress)
    workers = max(1, min(opts.workers, len(todo))) if todo else 0
    try:
        if workers <= 1:
            counter = mp.Value("q", 0)
            _init_worker(counter)
            for i in todo:
                convert_shard(i)
                bar.update_to(counter.value)
        else:
            ctx = mp.get_context("fork")
            counter = ctx.Value("q", 0)
            finished = threading.Semaphore(0)
            with ctx.Pool(workers, initializer=_init_worker, initargs=(counter,)) as pool:
                results = [pool.apply_async(convert_shard, (i,), callback=lambda _: finished.release(),
                                            error_callback=lambda _: finished.release()) for i in todo]
                for _ in results:  # wake on every finished shard, and at least every 0.5 s for the display
                    while not finished.acquire(timeout=0.5):
                        bar.update_to(counter.value)
                    bar.update_to(counter.value)
                for r in results:
                    r.get()  # re-raise a worker's exception
        bar.update_to(n_todo)
    finally:
        bar.close()
        _W.pop("counter", None)
    dt = time.perf_counter() - t0
    summary = {"split": opts.split, "converted_shards": len(todo), "converted_images": n_todo,
               "seconds": dt, "images_per_s": n_todo / dt if dt > 0 else 0.0}
    missing = [i for i in range(plan.num_shards) if not record_path(out, plan, i).exists()]
    if not missing:
        summary.update(finalize(out, opts.split))
    else:
        summary["shards_missing"] = len(missing)
        log.info("%d shards of other tasks are not done yet; run `sere-prep merge %s --split %s` after them",
                 len(missing), out, opts.split)
    return summary


@contextmanager
def _locked(out: Path):
    with open(out / ".sere-prep.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def finalize(out: str | os.PathLike, split: str) -> dict:
    """Write ``_info.json`` (this split, other splits kept) and ``_report-<split>.json`` from the records."""
    out = Path(out)
    if not plan_path(out, split).exists():
        raise FileNotFoundError(f"{plan_path(out, split)} not found: nothing was converted for '{split}' in {out}")
    plan = load_plan(out, split)
    recs, missing = [], []
    for i in range(plan.num_shards):
        rp = record_path(out, plan, i)
        if not rp.exists() or not (out / plan.shard_name(i)).exists():
            missing.append(plan.shard_name(i))
        else:
            recs.append(json.loads(rp.read_text()))
    if missing:
        raise RuntimeError(f"{len(missing)} of {plan.num_shards} '{split}' shards are not converted yet "
                           f"(e.g. {missing[0]}): run the conversion (or the remaining array tasks) first")
    corrupt = sorted((c for r in recs for c in r["corrupt"]), key=lambda c: c[0])
    reenc = sorted((c for r in recs for c in r["reencoded"]), key=lambda c: c[0])
    n = sum(r["count"] for r in recs)
    if n + len(corrupt) != len(plan.inputs):
        raise RuntimeError(f"records account for {n} + {len(corrupt)} corrupt != {len(plan.inputs)} inputs")
    report = {"split": split, "num_inputs": len(plan.inputs), "num_samples": n, "num_corrupt": len(corrupt),
              "corrupt": [{"path": p, "reason": why} for _, p, why in corrupt],
              "num_reencoded": len(reenc), "reencoded": [{"path": p, "reason": why} for _, p, why in reenc]}
    atomic_write_text(out / f"_report-{split}.json", json.dumps(report, indent=1))
    with _locked(out):
        info_p = out / "_info.json"
        info = json.loads(info_p.read_text()) if info_p.exists() else {}
        info.setdefault("splits", {})
        info["name"] = plan.prefix
        info["num_classes"], info["classes"] = len(plan.classes), plan.classes
        info["splits"][split] = {
            "name": split, "num_samples": n, "filenames": [r["name"] for r in recs],
            "shard_lengths": [r["count"] for r in recs], "num_corrupt": len(corrupt), "seed": plan.seed,
            "shard_size": plan.shard_size}
        atomic_write_text(info_p, json.dumps(info, indent=1))
        write_wids_index(out, f"{plan.prefix}-{split}", split, [r["name"] for r in recs], [r["count"] for r in recs])
    if corrupt:
        log.warning("%s: skipped %d unreadable inputs (listed in %s)", split, len(corrupt),
                    out / f"_report-{split}.json")
    return {"num_samples": n, "num_corrupt": len(corrupt), "num_reencoded": len(reenc),
            "num_shards": plan.num_shards}


def wids_index_path(out: str | os.PathLike, split: str) -> Path:
    return Path(out) / f"_wids-{split}.json"


def write_wids_index(out: Path, name: str, split: str, filenames: list, counts: list) -> Path:
    """The split's ``wids`` shard index (``wids.ShardListDataset("OUT/_wids-SPLIT.json")``): format
    ``wids-shard-index-v1``, shard URLs relative to the index's folder, with their sample counts and sizes."""
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": name,
             "shardlist": [{"url": f, "nsamples": int(n), "filesize": (Path(out) / f).stat().st_size}
                           for f, n in zip(filenames, counts)]}
    p = wids_index_path(out, split)
    atomic_write_text(p, json.dumps(index, indent=1))
    return p
