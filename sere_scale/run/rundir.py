"""A run directory belongs to one run, written by one process group at a time.

- A fresh run (no ``--resume``) refuses an ``output_dir`` that holds another run (``checkpoints/step_*`` or
  ``metrics.jsonl``) unless started with ``--move-old``, which renames the old folder to ``<output_dir>.old-N``
  (the first free N) before anything is written.
- Rank 0 holds ``<output_dir>/.lock`` (JSON: host, pid, job id, restart counts, time) while it trains; a second
  run into the same folder is refused with the holder's host and pid. A lock is stale — taken over with a
  warning — when its holder is a dead process on this host, or when it was taken by an earlier attempt of the same
  job: the same ``SLURM_JOB_ID`` or ``TORCHELASTIC_RUN_ID`` and lower ``SLURM_RESTART_COUNT`` /
  ``TORCHELASTIC_RESTART_COUNT`` (a torchrun ``--max-restarts`` restart or a slurm requeue, whose old holder
  is dead or being torn down, possibly on another node).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Optional

from sere_scale.config.load import ConfigError

log = logging.getLogger("sere_scale")
LOCK = ".lock"


class RunDirError(ConfigError):
    """The run directory cannot be used as asked (exit 2); the message says what to do."""


def holds_run(run_dir: Path) -> bool:
    """True if ``run_dir`` holds a run's checkpoints or metrics."""
    ck = run_dir / "checkpoints"
    has_ckpt = ck.is_dir() and any(p.is_dir() for p in ck.glob("step_*"))
    metrics = run_dir / "metrics.jsonl"
    return has_ckpt or (metrics.exists() and metrics.stat().st_size > 0)


def check_fresh(run_dir: Path, resume: bool, move_old: bool) -> None:
    """Refuse a fresh run into a folder holding another run, unless ``move_old`` (read-only)."""
    if resume or move_old or not run_dir.exists() or not holds_run(run_dir):
        return
    raise RunDirError(
        f"output_dir '{run_dir}' already holds a run (checkpoints or metrics.jsonl). Continue it with --resume, "
        f"move it aside with --move-old (renamed to '{run_dir}.old-N'), or choose another output_dir.")


def move_aside(run_dir: Path) -> Optional[Path]:
    """Rename ``run_dir`` to ``<run_dir>.old-N`` (first free N) if it holds a run; returns the new path."""
    if not run_dir.exists() or not holds_run(run_dir):
        return None
    n = 1
    while Path(f"{run_dir}.old-{n}").exists():
        n += 1
    dst = Path(f"{run_dir}.old-{n}")
    os.replace(run_dir, dst)
    log.warning("--move-old: the previous run in %s was moved to %s", run_dir, dst)
    return dst


def _me() -> dict:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "slurm_job": env.get("SLURM_JOB_ID", ""), "elastic_run": env.get("TORCHELASTIC_RUN_ID", ""),
            "restart": [int(env.get(k, 0) or 0) for k in ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")],
            "time": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(holder: dict, me: dict) -> Optional[str]:
    """Why ``holder``'s lock may be taken over by ``me``, or None if it is held."""
    if holder.get("host") == me["host"]:
        pid = int(holder.get("pid", -1))
        if pid == me["pid"]:
            return "it is this process's own"
        if not _alive(pid):
            return f"its holder (pid {pid}) is no longer running"
    same_job = any(holder.get(k) and holder.get(k) == me[k] for k in ("slurm_job", "elastic_run"))
    if same_job and list(holder.get("restart", [0, 0])) < me["restart"]:
        return (f"it was taken by an earlier attempt of this job (restart counts {holder.get('restart')}, now "
                f"{me['restart']})")
    return None


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.me = _me()
        self.held = False

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # torn or unreadable: treated as stale below (no pid to wait for)

    def check(self) -> None:
        """Raise :class:`RunDirError` if another live run holds the lock (read-only)."""
        h = self.holder()
        if h and stale_reason(h, self.me) is None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("time", 0)))
            raise RunDirError(
                f"output_dir '{self.path.parent}' is in use by another run (host {h.get('host')}, pid {h.get('pid')}, "
                f"since {since}; lock file {self.path}). Wait for it to finish, use another output_dir, or — if that "
                f"process is gone for good — delete the lock file.")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check()
                h = self.holder()
                why = stale_reason(h, self.me) if h else "it is unreadable"
                log.warning("taking over the lock %s of host %s pid %s: %s", self.path, (h or {}).get("host"),
                            (h or {}).get("pid"), why)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return
        self.check()
        raise RunDirError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            h = self.holder()
            if h and h.get("pid") == self.me["pid"] and h.get("host") == self.me["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False
