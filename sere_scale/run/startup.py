"""Training start-up in the order that keeps a run folder intact: read-only checks (ownership, lock), the config
checks that need the model and data, the resume point — and only then the first write (lock, config.yaml,
REQUEUE marker, metrics). Every rank agrees on a refusal before any collective, so no rank is left waiting."""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

import torch

from sere_scale.engine.checkpoint import CheckpointManager, find_latest
from sere_scale.config.load import Config, ConfigError, save_config, validate_model
from sere_scale.engine.distributed import DistInfo, all_reduce_sum
from sere_scale.run.rundir import RunDirError, RunLock, check_fresh, move_aside
from sere_scale.run.resume import check_resume, load_resume_point, set_aside

log = logging.getLogger("sere_scale")


def _agree(err: BaseException | None, info: DistInfo) -> None:
    """Raise on every rank if ``err`` is set on any (the others get a short pointer to it)."""
    if info.distributed:
        flag = torch.tensor([0.0 if err is None else 1.0], device=info.device)
        if all_reduce_sum(flag).item() > 0 and err is None:
            raise RunDirError("another rank refused to start (see rank 0's message)")
    if err is not None:
        raise err


def build_trackers_agreed(cfg: Config, resume: bool, info: DistInfo):
    """Rank 0's experiment trackers (``trackers.build_trackers``: each checked before anything is written), every
    rank raising if one cannot start (the others are not left waiting in the next collective)."""
    from sere_scale.run.trackers import build_trackers
    trackers, err = [], None
    if info.is_main:
        try:
            trackers = build_trackers(cfg, resume)
        except ConfigError as e:
            err = e
    _agree(err, info)
    return trackers


def check_run_dir(run_dir: Path, resume: bool, move_old: bool, info: DistInfo) -> RunLock:
    """Read-only: refuse a folder holding another run (fresh start) or in use by a live run."""
    lock, err = RunLock(run_dir), None
    if info.is_main:
        try:
            lock.check()  # first, and also before --move-old: a live run is never moved
            check_fresh(run_dir, resume, move_old)
        except RunDirError as e:
            err = e
    _agree(err, info)
    return lock


def validate_built(cfg: Config, student) -> None:
    from sere_scale.models.backbone import patch_size_of
    bb = student.backbone
    validate_model(cfg, bb.embed_dim, bb.num_heads, patch_size_of(cfg.model))


def seed_everything(seed: int, rank: int) -> None:
    """Each rank's own random stream (drop-path, masks drawn on the device, ...)."""
    import random

    import numpy as np
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def build_model(cfg: Config, method_cls=None):
    """Student, teacher (same seed on every rank: identical initial weights) and the method
    (``method_cls(cfg, num_heads)``, ``SEREMethod`` by default); the config checked against the built model."""
    from sere_scale.method.sere_method import SEREMethod
    from sere_scale.models.network import build_student_teacher
    torch.manual_seed(cfg.train.seed)
    student, teacher = build_student_teacher(cfg)
    validate_built(cfg, student)
    return student, teacher, (method_cls or SEREMethod)(cfg, student.backbone.num_heads)


def init_weights(cfg: Config, student, teacher, run_dir: Path, resume: bool):
    """``model.init_from`` loaded into student and teacher (its report), or None: not set, or resuming from a
    checkpoint (which holds the weights)."""
    if not cfg.model.init_from:
        return None
    if resume and find_latest(run_dir / "checkpoints") is not None:
        return None
    from sere_scale.models.init_from import init_from
    return init_from(cfg.model.init_from, cfg, student, teacher)


def build_parts(cfg: Config, info: DistInfo, method_cls=None, engine_factory=None):
    """``build_model``, each rank's seed, then the engine: (method, engine), for the profiler and benchmarks."""
    from sere_scale.engine import build_engine
    student, teacher, method = build_model(cfg, method_cls)
    seed_everything(cfg.train.seed, info.rank)
    return method, (engine_factory or build_engine)(cfg, student, teacher, method, info)


def build_loader(cfg: Config, info: DistInfo, build):
    """``build(cfg, rank, world)``, with data problems (empty folder, fewer images than one global batch,
    missing shards) reported as config errors naming the data key."""
    key = "data.shards" if cfg.data.shards else "data.path"
    try:
        return build(cfg, info.rank, info.world_size)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:
        if "global batch" in str(e) or "not one batch" in str(e):
            key = "data.batch_size"
        raise ConfigError(f"config key '{key}': {e}") from None


def check_resume_config(run_dir: Path, cfg: Config, info: DistInfo, loader) -> None:
    """Before the engine is built (read-only): a resume must not change what exactness depends on."""
    err = None
    try:
        check_resume(run_dir, cfg, info.world_size, loader)
    except ConfigError as e:
        err = e
    _agree(err, info)


def load_resume(engine, run_dir: Path, cfg: Config, info: DistInfo, loader):
    """The resume point (``{"state", "path", "meta", "corrupt"}``) or None (no checkpoint: a fresh start)."""
    found = load_resume_point(engine, run_dir, cfg, info.world_size, loader)
    if found is None:
        log.warning("--resume: no checkpoint under %s, starting from scratch", run_dir)
        return None
    state, path, meta, corrupt = found
    log.info("resumed from %s (step %d)", path, state["step"])
    return {"state": state, "path": path, "meta": meta, "corrupt": corrupt}


def open_run_dir(cfg: Config, run_dir: Path, info: DistInfo, lock: RunLock, loaded, loader,
                 move_old: bool, requeue_marker: str) -> CheckpointManager:
    """The first writes: move an old run aside (``--move-old``), take the lock, write config.yaml, clear the
    REQUEUE marker, set corrupt checkpoints aside. Returns the run's checkpoint manager."""
    err = None
    if info.is_main:
        try:
            if move_old:
                move_aside(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            save_config(cfg, run_dir / "config.yaml")
            (run_dir / requeue_marker).unlink(missing_ok=True)
            if loaded is not None:
                set_aside(loaded["corrupt"])
        except RunDirError as e:
            err = e
        except OSError as e:  # e.g. no permission: reported on every rank instead of leaving them waiting
            err = RunDirError(f"cannot write the run folder '{run_dir}': {e}")
    _agree(err, info)
    run_id = [(loaded or {}).get("meta", {}).get("run_id") or uuid.uuid4().hex]
    if info.distributed:  # rank 0's: every rank must see the same run's checkpoints
        import torch.distributed as dist
        dist.broadcast_object_list(run_id, src=0)
    run_id = run_id[0]
    meta = {"run_id": run_id, "config": cfg.to_dict()}
    if hasattr(loader, "fingerprint"):
        meta["loader"] = loader.fingerprint()
    return CheckpointManager(run_dir, cfg.checkpoint.keep, info.is_main, meta=meta, device=info.device)
