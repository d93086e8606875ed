"""Hang watchdog: a rank that completes no optimiser step for ``train.hang_timeout_s`` ends the job.

A stalled rank (a dead-locked loader, a collective waiting on a frozen peer, a wedged device) would otherwise
hold the whole allocation until the process-group timeout, or forever. The watchdog is a daemon thread: when
the deadline passes it writes every thread's stack (``faulthandler``, all threads) to stderr and to
``OUTPUT_DIR/hang_rank{R}.txt``, leaves the marker ``OUTPUT_DIR/HANG`` (the slurm/ templates requeue on it,
and the requeued job resumes from the last checkpoint) and exits the process with ``EXIT_HANG`` (125).

The first step (model build, compile, loader workers starting, resume), evaluation hooks and checkpoint saves
get ``GRACE`` times the timeout (``extend``); every completed step (``beat``) restarts the clock.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("sere_scale")

EXIT_HANG = 125  # exit code after the hang watchdog fired (3: non-finite loss, 124: preempted, 2: bad config)
HANG_MARKER = "HANG"  # written next to the checkpoints (lines "rank R"), for launchers that hide exit codes
GRACE = 3.0  # the first step, evaluation hooks and checkpoint saves may take GRACE x train.hang_timeout_s


class HangWatchdog:
    """``start()`` arms it with the first-step grace; ``beat(step)`` after each optimiser step; ``extend(what)``
    before a long non-step phase (a ``beat(step)`` after it restores the normal timeout); ``stop()`` disarms
    it. Never started, it only records (``train`` without a watchdog)."""

    def __init__(self, timeout_s: float, run_dir, rank: int = 0):
        self.timeout_s, self.run_dir, self.rank = float(timeout_s), Path(run_dir), int(rank)
        self._deadline, self._what, self._step = 0.0, "the first step", 0
        self._since = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HangWatchdog:
        self.extend("the first step")
        self._thread = threading.Thread(target=self._watch, name="sere-hang-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """Optimiser step ``step`` completed (or a long phase after it ended): the next step has ``timeout_s``."""
        self._step = step
        self._arm(self.timeout_s, f"step {step + 1}")

    def extend(self, what: str) -> None:
        """``what`` (a phase that is not a step) may take ``GRACE`` x ``timeout_s``."""
        self._arm(GRACE * self.timeout_s, what)

    def _arm(self, seconds: float, what: str) -> None:
        now = time.monotonic()
        self._since, self._what, self._deadline = now, what, now + seconds

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _watch(self) -> None:
        poll = max(0.05, min(5.0, self.timeout_s / 20))
        while not self._stop.wait(poll):
            if time.monotonic() > self._deadline:
                self._fire()

    def _fire(self) -> None:
        waited = time.monotonic() - self._since
        msg = (f"hang watchdog: rank {self.rank} (pid {os.getpid()}) made no progress for {waited:.0f} s while "
               f"waiting for {self._what} (last step completed: {self._step}; train.hang_timeout_s="
               f"{self.timeout_s:g}); stacks of every thread follow; exiting with code {EXIT_HANG}\n")
        sys.stderr.write(msg)
        sys.stderr.flush()
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / f"hang_rank{self.rank}.txt"
            with path.open("w") as f:
                f.write(msg)
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            with (self.run_dir / HANG_MARKER).open("a") as f:
                f.write(f"rank {self.rank}\n")
            sys.stderr.write(f"hang watchdog: stacks written to {path}\n")
        except OSError as e:  # the log has the stacks already
            sys.stderr.write(f"hang watchdog: could not write to {self.run_dir}: {e}\n")
        sys.stderr.flush()
        os._exit(EXIT_HANG)
