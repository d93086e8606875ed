"""Atomic checkpoint folders: ``checkpoints/step_XXXXXXXX/`` plus a ``latest`` pointer.

Every rank writes its part into ``step_XXXXXXXX.tmp``; rank 0 then writes ``meta.json``, renames the folder
and replaces ``latest`` (both atomic renames). A crash at any point leaves the previous checkpoint whole and
``latest`` pointing at it; stale ``.tmp`` folders are ignored and cleaned up on the next save.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from .distributed import barrier


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
    def __init__(self, run_dir: str | os.PathLike, keep: int = 2, is_main: bool = True):
        self.root = Path(run_dir) / "checkpoints"
        self.keep, self.is_main = keep, is_main
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)

    def save(self, engine, train_state: dict) -> Path:
        name = f"step_{train_state['step']:08d}"
        final, tmp = self.root / name, self.root / (name + ".tmp")
        if self.is_main:
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        engine.save(str(tmp), train_state)
        barrier()
        if self.is_main:
            meta = {"step": train_state["step"], "backend": engine.name, "world_size": engine.info.world_size,
                    "time": time.time()}
            (tmp / "meta.json").write_text(json.dumps(meta))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ptr = self.root / "latest.tmp"
            ptr.write_text(name)
            os.replace(ptr, self.root / "latest")
            _fsync_dir(self.root)
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[: max(len(done) - self.keep, 0)]:
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        return find_latest(self.root)


def find_latest(root: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint under ``root`` (a run's ``checkpoints/`` folder or a run folder)."""
    root = Path(root)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    ptr = root / "latest"
    if ptr.exists():
        cand = root / ptr.read_text().strip()
        if (cand / "meta.json").exists():
            return cand
    done = sorted(p for p in root.glob("step_*") if (p / "meta.json").exists() and not p.name.endswith(".tmp"))
    return done[-1] if done else None
