"""The project's DataLoader workers: started once per run, from a start method that is safe in a multithreaded
process, leaving the job's signals to the training process, and a wait for a batch bounded by a timeout whose
error names the workers and the data.

* **Start method.** Forking the training process (which runs gloo's, TensorBoard's and the previous iterator's
  threads) can deadlock the child inside CPython's after-fork hook, so workers come from a *forkserver* (a clean
  single-threaded process started by exec on first use, which forks them; *spawn* where there is none).
  The forkserver preloads torch and the data modules, so a worker starts in well under a second.
* **Once per run.** Training loaders keep one ``DataLoader`` with ``persistent_workers=True`` for the whole run
  and pass everything that changes per epoch (epoch, resume position) through the sampler's indices, since the
  workers' copies of the dataset never see the main process's attributes again (``loader.py``, ``shards.py``).
* **Signals.** Workers (and the forkserver, started on first use) start inside ``worker_signals.
  job_signals_held()`` and run ``worker_signals.worker_init`` first: SIGUSR1/SIGINT ignored, SIGTERM obeyed only
  from the training process (``Process.terminate`` at exit), so a job-wide SIGTERM (``killpg``, Slurm) reaches
  the training process alone. A worker ends by itself when the training process is gone (however it died) or its
  forkserver exits.
* **Timeout.** ``data.worker_timeout_s`` bounds the wait for one batch (DataLoader ``timeout``); when it passes,
  :class:`LoaderTimeout` names the data, the batch waited for, and each worker's id, pid and state.

Test hook: with ``SERE_WORKER_PID_DIR`` set, each worker touches ``<dir>/<RANK>-<pid>`` when it starts.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from functools import partial
from typing import Callable, Iterator, Optional

from sere_scale.data.worker_signals import job_signals_held, worker_init

DEFAULT_TIMEOUT_S = 600.0  # forkserver/spawn workers need seconds to start; one slow batch must not kill a run
PID_DIR_ENV = "SERE_WORKER_PID_DIR"
# Not "__main__": loader datasets and transforms live in the package. (Each worker still imports the main script
# as __mp_main__ when it starts, as with spawn: a training script must guard its work with __main__.)
_PRELOAD = ["torch", "sere_scale.data.loader", "sere_scale.data.shards", "sere_scale.data.evaldata"]


class LoaderTimeout(RuntimeError):
    """No batch from the loader's workers within ``data.worker_timeout_s``."""


def start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def mp_context():
    ctx = multiprocessing.get_context(start_method())
    if start_method() == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)  # takes effect when this process starts its forkserver
        start_forkserver()
    return ctx


def start_forkserver() -> None:
    """Start this process's forkserver now, deaf to the job's signals (SIGTERM/SIGUSR1 blocked, SIGINT ignored),
    so a job-wide SIGTERM (``killpg``, Slurm) cannot kill it while it forks workers: its workers would die with it
    (``_die_with_parent``) and the training process with them, before its preemption checkpoint. The resource
    tracker is started first, outside the hold: its start unblocks SIGINT/SIGTERM in the calling thread
    (CPython's ``resource_tracker.ensure_running``), which would undo the hold for the forkserver started after
    it. Both are no-ops once running."""
    from multiprocessing import forkserver, resource_tracker
    resource_tracker.ensure_running()
    with job_signals_held():
        forkserver.ensure_running()


def _die_with_parent() -> None:
    """SIGKILL this worker when its parent (the forkserver) dies: a worker ignores SIGTERM, and one stuck in I/O
    never reaches the DataLoader's own parent check."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _exit_with(trainer_pid: int, every_s: float = 1.0) -> None:
    """End this worker when the training process is gone. The DataLoader's own check watches the worker's parent,
    here the forkserver, and the forkserver lives while any worker holds its liveness pipe (every process it
    starts gets one): without this, a training process killed with SIGKILL would leave both behind for good."""
    def watch():
        while True:
            time.sleep(every_s)
            state = _state(trainer_pid)
            if state == "gone" or state.startswith("Z"):
                from sere_scale.data.pipes import end_all
                end_all()  # its pipe: shard commands end with it
                os._exit(0)
    threading.Thread(target=watch, name="sere-trainer-watch", daemon=True).start()


def _start_worker(worker_id: int, pids, user_init: Optional[Callable], trainer_pid: int = 0) -> None:
    worker_init(worker_id, trainer_pid or None)  # SIGTERM obeyed from the trainer only (Process.terminate)
    _die_with_parent()
    if trainer_pid > 0:
        _exit_with(trainer_pid)
    pids[worker_id] = os.getpid()
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        with open(os.path.join(pid_dir, f"{os.environ.get('RANK', '0')}-{os.getpid()}"), "w"):
            pass
    if user_init is not None:
        user_init(worker_id)


class Workers:
    """``DataLoader`` keyword arguments for ``num_workers`` workers (none for 0) and the timeout's error."""

    def __init__(self, num_workers: int, timeout_s: float, what: str, init_fn: Optional[Callable] = None):
        if timeout_s < 0:
            raise ValueError(f"worker timeout must be >= 0 s (0: none), got {timeout_s}")
        self.num_workers, self.timeout_s, self.what = num_workers, float(timeout_s), what
        self.ctx = mp_context() if num_workers > 0 else None
        self.pids = self.ctx.Array("q", num_workers, lock=False) if num_workers > 0 else None
        self.init_fn = init_fn

    def kwargs(self, persistent: bool = True) -> dict:
        if self.num_workers == 0:
            return {"num_workers": 0}
        return {"num_workers": self.num_workers, "multiprocessing_context": self.ctx,
                "persistent_workers": persistent, "timeout": self.timeout_s,
                "worker_init_fn": partial(_start_worker, pids=self.pids, user_init=self.init_fn,
                                          trainer_pid=os.getpid())}

    def guard(self, it: Iterator, where: Callable[[], str] = lambda: "the next batch") -> Iterator:
        """``it``'s items; a DataLoader timeout becomes a :class:`LoaderTimeout` naming workers and data."""
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                if self.num_workers == 0 or "timed out" not in str(e):
                    raise
                msg = self.describe(where())
                self.kill()  # they ignore SIGTERM: a stalled one would outlive the DataLoader's shutdown
                raise LoaderTimeout(msg) from e
            yield item

    def kill(self) -> None:
        """SIGKILL every worker of this loader that started (after a timeout)."""
        for pid in self.pids or ():
            if pid > 0:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def describe(self, where: str) -> str:
        states = ", ".join(f"worker {i} (pid {p}: {_state(p)})" for i, p in enumerate(self.pids))

        return (f"no batch from the loader workers in data.worker_timeout_s={self.timeout_s:g} s while waiting "
                f"for {where} of {self.what}; workers: {states}. A stalled or very slow worker: check the data "
                f"(storage, a huge or corrupt file), or raise data.worker_timeout_s (0: no timeout)")


def _state(pid: int) -> str:
    """The process state as /proc tells it (running, sleeping, stopped, zombie, ...), else 'not started'."""
    if pid <= 0:
        return "not started"
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:"):
                    return line.split(None, 1)[1].strip()
    except OSError:
        pass
    try:
        os.kill(pid, 0)
        return "alive"
    except OSError:
        return "gone"
