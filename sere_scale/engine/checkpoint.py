"""Atomic checkpoint folders: ``checkpoints/step_XXXXXXXX/`` plus a ``latest`` pointer.

Every rank writes its part into ``step_XXXXXXXX.tmp``; rank 0 then writes ``meta.json``, renames the folder
and replaces ``latest`` (both atomic renames). A crash at any point leaves the previous checkpoint whole and
``latest`` pointing at it; stale ``.tmp`` folders are ignored and cleaned up on the next save.

``meta.json`` also records the run's id (pruning and ``find_latest(..., run_id=)`` consider only that run's
checkpoints), the run's config (``run/resume.py`` checks a resume against it) and the size of every file of the
checkpoint (``verify``: a truncated or missing part marks the checkpoint corrupt). A save that fails on any rank
(disk full, ...) raises :class:`CheckpointSaveError` naming the folder and the free space, removes the partial
folder and leaves the previous checkpoint and ``latest`` as they were. ``latest`` never names a pruned folder.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from sere_scale.engine.distributed import all_reduce_sum, barrier


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoint is intact."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def _manifest(folder: Path) -> dict:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}


def read_meta(ckpt: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def verify(ckpt: str | os.PathLike) -> Optional[str]:
    """None if every file ``meta.json`` lists is there with its size, else what is wrong (older checkpoints
    without a file list pass)."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if not meta:
        return "meta.json is missing or unreadable"
    for rel, size in meta.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class CheckpointManager:
    """``meta`` (run id, config, ...) goes into every checkpoint's ``meta.json``; only checkpoints of
    ``meta["run_id"]`` (or without a run id: older ones) are pruned."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2, is_main: bool = True, meta: Optional[dict] = None,
                 device=None):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.is_main, self.meta, self.device = keep, is_main, dict(meta or {}), device
        self.hold: set[str] = set()  # folder names never pruned (the collapse alarm holds a pre-collapse one)

    def _agree(self, failed: Optional[BaseException]) -> bool:
        """True if some rank failed (one all-reduce in place of a barrier, so a failing rank cannot hang the others)."""
        flag = torch.tensor([0.0 if failed is None else 1.0], device=self.device)
        return all_reduce_sum(flag).item() > 0

    def _error(self, where: Path, name: str, e: Optional[BaseException]) -> CheckpointSaveError:
        probe = where if where.exists() else self.root if self.root.exists() else self.root.parent
        try:
            du = shutil.disk_usage(probe)
            space = f"{_size(du.free)} free of {_size(du.total)} on that file system"
        except OSError:
            space = "free space unknown"
        prev = find_latest(self.root, self.meta.get("run_id"))
        cause = f"{type(e).__name__}: {e}" if e is not None else "another rank failed to write its part"
        return CheckpointSaveError(
            f"saving checkpoint {name} to {where} failed ({cause}); {space}. The last good checkpoint "
            f"{prev if prev is not None else '(none)'} is intact and 'latest' still names it: free space (or lower "
            f"checkpoint.keep) and continue with --resume.")

    def save(self, engine, train_state: dict) -> Path:
        name = f"step_{train_state['step']:08d}"
        final, tmp = self.root / name, self.root / (name + ".tmp")
        err = None
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob("*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                err = e
        if self._agree(err):
            raise self._error(tmp, name, err)
        try:
            engine.save(str(tmp), train_state)
        except Exception as e:  # noqa: BLE001 - disk full, quota, I/O error: reported with the path and space
            err = e
        failed = self._agree(err)
        if self.is_main and not failed:
            try:
                meta = {"step": train_state["step"], "backend": engine.name, "world_size": engine.info.world_size,
                        "time": time.time(), **self.meta, "files": _manifest(tmp)}
                (tmp / "meta.json").write_text(json.dumps(meta))
                _fsync_dir(tmp)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self.set_latest(name)
            except OSError as e:
                err = e
        if failed or self._agree(err):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                (self.root / "latest.tmp").unlink(missing_ok=True)
            raise self._error(tmp, name, err)
        if self.is_main:
            self._prune()
        barrier()
        return final

    def _mine(self, p: Path) -> bool:
        rid = read_meta(p).get("run_id")
        return rid is None or rid == self.meta.get("run_id")

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and p.suffix == "" and self._mine(p))
        ptr = self.root / "latest"
        current = ptr.read_text().strip() if ptr.exists() else None
        for p in done[: max(len(done) - self.keep, 0)]:
            if p.name != current and p.name not in self.hold:  # 'latest' never names a removed folder
                shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        return find_latest(self.root, self.meta.get("run_id"))

    def set_latest(self, name: Optional[str]) -> None:
        """Point ``latest`` at the folder ``name`` (atomic rename), or remove it (None). Rank 0."""
        ptr = self.root / "latest.tmp"
        if name is None:
            (self.root / "latest").unlink(missing_ok=True)
        else:
            ptr.write_text(name)
            os.replace(ptr, self.root / "latest")
        _fsync_dir(self.root)


def checkpoints(root: str | os.PathLike, run_id: Optional[str] = None) -> list[Path]:
    """Complete checkpoints under ``root`` (of ``run_id`` only, if given), newest first; the one ``latest`` names
    comes first."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    done = sorted((p for p in root.glob("step_*") if p.suffix == "" and (p / "meta.json").exists()
                   and (run_id is None or read_meta(p).get("run_id") in (None, run_id))), reverse=True)
    ptr = root / "latest"
    if ptr.exists():
        named = root / ptr.read_text().strip()
        if named in done:
            done.remove(named)
            done.insert(0, named)
    return done


def find_latest(root: str | os.PathLike, run_id: Optional[str] = None) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/`` folder or a run folder): the one
    ``latest`` names if it is complete, else the highest step; with ``run_id``, only that run's."""
    done = checkpoints(root, run_id)
    return done[0] if done else None
