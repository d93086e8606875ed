"""Atomic checkpoint folders: ``checkpoints/step_XXXXXXXX/`` plus a ``latest`` pointer.

Every rank writes its part into ``step_XXXXXXXX.tmp``; rank 0 then writes ``meta.json``, renames the folder
and replaces ``latest`` (both atomic renames). A crash at any point leaves the previous checkpoint whole and
``latest`` pointing at it; stale ``.tmp`` folders are ignored and cleaned up on the next save.

``meta.json`` also records the run's id (pruning and ``find_latest(..., run_id=)`` consider only that run's
checkpoints), the run's config (``run/resume.py`` checks a resume against it) and the size of every file of the
checkpoint (``verify``: a truncated or missing part marks the checkpoint corrupt). A save that fails on any rank
(disk full, ...) raises :class:`CheckpointSaveError` naming the folder and the free space, removes the partial
folder and leaves the previous checkpoint and ``latest`` as they were. ``latest`` never names a pruned folder.
Before writing, every rank checks its pieces of the weights, teacher, buffers and centers for NaN/inf
(``count_nonfinite``: one max-abs per tensor on the device, one all-reduce with the save's first vote): a poisoned
state is refused with :class:`NonFiniteCheckpointError` and never becomes ``latest``.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch

from sere_scale.engine.distributed import all_reduce_sum, barrier

log = logging.getLogger("sere_scale")


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoint is intact."""


class NonFiniteCheckpointError(CheckpointSaveError):
    """The state to save holds NaN/inf values: refused; the previous checkpoint stays ``latest``."""


try:  # torch.distributed.checkpoint's error derives from BaseException: ``except Exception`` would miss it
    from torch.distributed.checkpoint.api import CheckpointException as _DCPError
except ImportError:  # pragma: no cover - torch without torch.distributed
    _DCPError = Exception


def _cause(e: BaseException) -> str:
    """One line per failure: DCP's error carries every rank's exception and traceback; keep the exceptions."""
    failures = getattr(e, "failures", None)
    if isinstance(e, _DCPError) and isinstance(failures, dict) and failures:
        return "; ".join(f"rank {r}: {type(x[0]).__name__}: {x[0]}" for r, x in sorted(failures.items()))
    return f"{type(e).__name__}: {e}"


def count_nonfinite(named: list) -> torch.Tensor:
    """The number of tensors in ``named`` ((name, tensor) pairs) holding a NaN or inf, as a device tensor
    (no host sync): the max-abs of a tensor is finite exactly when all its elements are."""
    vals = [t.detach() for _, t in named if t.is_floating_point() and t.numel()]
    if not vals:
        return torch.zeros((), dtype=torch.float32)
    peaks = torch.stack([torch.linalg.vector_norm(v, float("inf")).float() for v in vals])
    return (~torch.isfinite(peaks)).sum().float()


def nonfinite_names(named: list, limit: int = 5) -> list[str]:
    """The names of the first ``limit`` tensors holding NaN/inf (host syncs: only once a save is refused)."""
    return [n for n, t in named if t.is_floating_point() and t.numel() and not torch.isfinite(t).all()][:limit]


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

    def _agree(self, failed: Optional[BaseException], nonfinite: Optional[torch.Tensor] = None):
        """(some rank failed, tensors with NaN/inf over all ranks): one all-reduce, in place of a barrier, so a
        failing rank cannot hang the others."""
        flag = torch.tensor([0.0 if failed is None else 1.0, 0.0], device=self.device)
        if nonfinite is not None:
            flag[1] = nonfinite.to(flag.device)
        n_failed, n_bad = all_reduce_sum(flag).tolist()
        return n_failed > 0, int(n_bad)

    def _error(self, where: Path, name: str, e: Optional[BaseException]) -> CheckpointSaveError:
        probe = where if where.exists() else self.root if self.root.exists() else self.root.parent
        try:
            du = shutil.disk_usage(probe)
            space = f"{_size(du.free)} free of {_size(du.total)} on that file system"
        except OSError:
            space = "free space unknown"
        prev = find_latest(self.root, self.meta.get("run_id"))
        cause = _cause(e) if e is not None else "another rank failed to write its part"
        return CheckpointSaveError(
            f"saving checkpoint {name} to {where} failed ({cause}); {space}. The last good checkpoint "
            f"{prev if prev is not None else '(none)'} is intact and 'latest' still names it: free space (or lower "
            f"checkpoint.keep) and continue with --resume.")

    def save(self, engine, train_state: dict) -> Path:
        name = f"step_{train_state['step']:08d}"
        final, tmp = self.root / name, self.root / (name + ".tmp")
        err = None
        named = engine.saved_tensors() if hasattr(engine, "saved_tensors") else []
        bad = count_nonfinite(named)
        if self.is_main:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob("*.tmp"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir(parents=True)
            except OSError as e:
                err = e
        failed, n_bad = self._agree(err, bad)
        if n_bad:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._poisoned(name, n_bad, nonfinite_names(named))
        if failed:
            raise self._error(tmp, name, err)
        try:
            engine.save(str(tmp), train_state)
        except (Exception, _DCPError) as e:  # noqa: BLE001 - disk full, quota, I/O error: reported with the path
            err = e
        failed = self._agree(err)[0]
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
        if failed or self._agree(err)[0]:
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                (self.root / "latest.tmp").unlink(missing_ok=True)
            raise self._error(tmp, name, err)
        if self.is_main:
            self._prune()
        barrier()
        return final

    def _poisoned(self, name: str, n_bad: int, names: list[str]) -> NonFiniteCheckpointError:
        prev = find_latest(self.root, self.meta.get("run_id"))
        where = f" (this rank: {', '.join(names)})" if names else " (on other ranks)"
        return NonFiniteCheckpointError(
            f"refusing to write checkpoint {name} to {self.root}: {n_bad} tensor(s) of the weights, teacher, "
            f"buffers or centers hold NaN/inf{where}. The last good checkpoint "
            f"{prev if prev is not None else '(none)'} stays 'latest'; resume from it with a lower lr.")

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


# ---------------------------------------------------------------------- reading: one path for every reader
class NoLoadableCheckpoint(RuntimeError):
    """No checkpoint of a run folder can be read (all are damaged)."""


class DamagedCheckpoint(RuntimeError):
    """The checkpoint folder named explicitly is damaged (truncated, missing or unreadable files)."""


def unreadable_error(e: BaseException) -> bool:
    """Whether ``e`` is what reading a damaged checkpoint file raises (truncated zip/pickle, DCP read errors)."""
    if isinstance(e, (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, _DCPError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("PytorchStreamReader" in text or "unexpected EOF" in text)


def read_first_good(root: str | os.PathLike, read: Callable[[Path], object], run_id: Optional[str] = None):
    """``(read(ckpt), ckpt, skipped)`` for the newest checkpoint under ``root`` (a run folder or its
    ``checkpoints/``) that passes ``verify`` (the sizes meta.json lists) and that ``read`` can read; each damaged
    newer one is skipped with a warning naming it (``skipped``). None when there is no checkpoint at all; raises
    :class:`NoLoadableCheckpoint` when every one is damaged. Errors of ``read`` other than an unreadable file
    (a config mismatch, ...) propagate. Used by ``--resume`` and by every reader of a run folder."""
    cands = checkpoints(root, run_id)
    if not cands:
        return None
    skipped = []
    for ck in cands:
        bad = verify(ck)
        if bad is None:
            try:
                return read(ck), ck, skipped
            except (Exception, _DCPError) as e:  # noqa: BLE001 - only unreadable files fall back
                if not unreadable_error(e):
                    raise
                bad = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log.warning("checkpoint %s is corrupt (%s): falling back to the previous one", ck, bad)
        skipped.append(ck)
    raise NoLoadableCheckpoint(f"no checkpoint under {Path(root)} can be read "
                               f"({', '.join(p.name for p in skipped)} are damaged)")


def read_checkpoint_folder(ckpt: str | os.PathLike, read: Callable[[Path], object]):
    """``read(ckpt)`` for one checkpoint folder named explicitly (no fallback): damage is a
    :class:`DamagedCheckpoint` naming the folder, its step and what is wrong."""
    ckpt = Path(ckpt)
    step = read_meta(ckpt).get("step", "?")
    bad = verify(ckpt)
    if bad is None:
        try:
            return read(ckpt)
        except (Exception, _DCPError) as e:  # noqa: BLE001 - only unreadable files are reported so
            if not unreadable_error(e):
                raise
            bad = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    raise DamagedCheckpoint(f"checkpoint {ckpt} (step {step}) is damaged ({bad}); give its run folder "
                            f"({ckpt.parent.parent}) to use the newest readable checkpoint instead")
