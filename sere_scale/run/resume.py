"""Resuming a run: find a loadable checkpoint (falling back past corrupt ones) and refuse changes that would
break an exact continuation, naming the key and what to do.

Checked against the checkpoint's ``meta.json`` (its run's config; for older checkpoints the run folder's
``config.yaml``):

- the model and heads (``model.*``, the head sizes, ``sere.heads``): the weights would not fit;
- ``data.batch_size`` and ``train.grad_accum``: the schedule and the epoch's data positions depend on them;
- ``engine.backend``: checkpoints do not convert between backends;
- the world size under DDP and DeepSpeed (under FSDP the sharded checkpoint is resharded: a documented
  continuation whose remaining data order follows the new world size);
- shards: ``data.num_workers`` and the rest of ``ShardLoader.fingerprint`` (``ShardLoader.load_state_dict``).

A checkpoint whose files do not match the sizes ``meta.json`` lists, or that fails to unpickle, is skipped with a
warning and renamed ``<name>.corrupt``; the previous one is used.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import yaml

from sere_scale.engine.checkpoint import NoLoadableCheckpoint, checkpoints, read_first_good, read_meta
from sere_scale.config.load import Config, ConfigError

log = logging.getLogger("sere_scale")

MUST_MATCH = ("model.arch", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
              "image_loss.kind", "image_loss.out_dim", "image_loss.hidden_dim", "image_loss.bottleneck_dim",
              "image_loss.norm_last_layer", "image_loss.moco_hidden_dim", "image_loss.moco_out_dim",
              "sere.heads", "sere.share_local_heads", "data.batch_size", "train.grad_accum", "engine.backend")
RESHARDS = ("fsdp",)  # backends whose checkpoints load at another world size


__all__ = ["NoLoadableCheckpoint", "check_compatible", "check_resume", "load_resume_point", "set_aside"]


def _get(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return KeyError
        d = d[part]
    return d


def saved_config(ckpt: Path, meta: dict) -> Optional[dict]:
    if "config" in meta:
        return meta["config"]
    p = ckpt.parent.parent / "config.yaml"  # older checkpoints: the run folder's config (not yet rewritten)
    try:
        return yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError):
        return None


def check_compatible(ckpt: Path, meta: dict, cfg: Config, world_size: int, backend: str, loader=None) -> None:
    """Raise :class:`ConfigError` naming the first setting that differs from the checkpoint's run."""
    hint = ("resume with the run's value (see its config.yaml), or start a new run in another output_dir "
            "(or with --move-old)")
    old, now = saved_config(ckpt, meta), cfg.to_dict()
    saved_backend = meta.get("backend", _get(old, "engine.backend") if old else KeyError)
    if saved_backend is not KeyError and saved_backend != backend:
        raise ConfigError(f"config key 'engine.backend': checkpoint {ckpt} was written by the '{saved_backend}' "
                          f"backend, this run uses '{backend}'; checkpoints do not convert between backends: "
                          f"resume with engine.backend={saved_backend}")
    if old is not None:
        for key in MUST_MATCH:
            a, b = _get(old, key), _get(now, key)
            if a is not KeyError and a != b:
                raise ConfigError(f"config key '{key}': checkpoint {ckpt} was trained with {a!r}, this config has "
                                  f"{b!r}; {hint}")
    w = meta.get("world_size")
    if w is not None and w != world_size:
        if backend not in RESHARDS:
            raise ConfigError(
                f"world size: checkpoint {ckpt} was written by {w} ranks, this launch has {world_size}; an exact "
                f"continuation under engine.backend={backend} needs the same number of ranks (nnodes x "
                f"nproc_per_node = {w}; only engine.backend=fsdp reshards)")
        log.warning("resuming a %d-rank checkpoint at %d ranks: FSDP reshards it; the rest of the data order "
                    "follows the new world size", w, world_size)
    saved_loader = meta.get("loader")
    if saved_loader and hasattr(loader, "load_state_dict") and world_size == w:
        mine = loader.fingerprint()
        if saved_loader.get("streams") != mine.get("streams"):
            n = saved_loader.get("streams")
            want = "0 or 1" if n == 1 else str(n)
            raise ConfigError(f"config key 'data.num_workers': checkpoint {ckpt} read its shards with {n} reader "
                              f"stream(s), this config has {mine.get('streams')}: the epoch order would change. "
                              f"Resume with data.num_workers={want}")
        try:
            loader.load_state_dict({**saved_loader, "rank": loader.rank, "epoch": 0, "batch": 0})
        except ValueError as e:
            raise ConfigError(f"config key 'data.shards': {e}") from None


def check_resume(run_dir: Path, cfg: Config, world_size: int, loader=None) -> None:
    """Before the engine is built: the newest checkpoint's run must match (:func:`check_compatible`)."""
    cands = checkpoints(run_dir)
    if cands:
        check_compatible(cands[0], read_meta(cands[0]), cfg, world_size, cfg.engine.backend, loader)


def load_resume_point(engine, run_dir: Path, cfg: Config, world_size: int, loader=None):
    """``(train_state, checkpoint, meta, corrupt)`` of the newest loadable checkpoint, or None if there is none;
    ``corrupt`` lists the newer checkpoints skipped (the caller renames them once it may write). The checks and
    the fallback are every reader's (``checkpoint.read_first_good``)."""
    def load(ck: Path):
        check_compatible(ck, read_meta(ck), cfg, world_size, cfg.engine.backend, loader)
        return engine.load(str(ck))
    try:
        found = read_first_good(run_dir, load)
    except NoLoadableCheckpoint as e:
        raise NoLoadableCheckpoint(f"{e}; start afresh with --move-old") from None
    if found is None:
        return None
    state, ck, corrupt = found
    if corrupt:
        log.warning("resuming from %s, the newest loadable checkpoint", ck)
    return state, ck, read_meta(ck), corrupt


def set_aside(corrupt: list[Path], why: str = "corrupt") -> None:
    """Rename checkpoints to ``<name>.<why>`` (kept for inspection, never loaded or pruned): the skipped corrupt
    ones, or (``collapsed``) those the collapse alarm wrote inside a collapse window."""
    for ck in corrupt:
        dst = ck.with_name(f"{ck.name}.{why}")
        if not dst.exists():
            ck.rename(dst)
            log.warning("renamed the %s checkpoint %s to %s", why, ck, dst.name)
