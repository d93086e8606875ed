"""Loader worker processes leave the job's signals to the training process.

Slurm, Kubernetes and torchrun's agent (which forwards with ``killpg``) deliver SIGTERM/SIGUSR1/SIGINT to every
process of the job, DataLoader workers included. A worker killed by one makes the training process fail
("DataLoader worker ... is killed by signal") before it can write its preemption checkpoint, so workers ignore
them: the training process finishes its step, checkpoints and shuts its workers down itself.

One SIGTERM is still obeyed: the one the worker's own parent sends. ``multiprocessing`` ends daemonic children
with ``Process.terminate()`` (SIGTERM) when the training process exits (and the DataLoader does when a worker
does not join); a worker deaf to it would make that exit wait forever. So SIGTERM is blocked and a thread of
the worker reads each one with ``sigwaitinfo``: sent by the parent, the worker dies of it as by default;
sent by anyone else (the job), it is dropped. Workers start inside ``job_signals_held()``, so they are born
with the signals blocked: none can kill a worker before ``worker_init`` runs (the DataLoader's own C handler
for SIGTERM, installed before it, would).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _sigterm_from_parent_only(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:  # the training process ends its worker: die of SIGTERM, as by default
            from sere_scale.data.pipes import end_all
            end_all()  # its pipe: shard commands end with it
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def job_signals_held():
    """Start loader workers inside this: SIGTERM/SIGUSR1/SIGINT are blocked in the calling thread meanwhile, so
    the workers it forks are born with them blocked; the training process gets any that came once they are
    unblocked again (or at once, in another of its threads)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_job_signals(parent: int | None = None) -> None:
    """Ignore SIGUSR1 and SIGINT in this process, and SIGTERM unless ``parent`` sends it (call first thing in a
    loader worker, from its main thread). ``parent``: the training process that owns the worker (default: the
    parent process; a forkserver worker's parent is the forkserver, but ``Process.terminate`` comes from the
    training process, so ``data/workers.py`` passes the trainer's pid)."""
    for sig in (signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1, signal.SIGINT})
    if not hasattr(signal, "sigwaitinfo"):  # no siginfo (macOS): ignore SIGTERM whoever sends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # first: threads started from here on inherit it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherited the training process's handler
    threading.Thread(target=_sigterm_from_parent_only, args=(parent or os.getppid(),), name="sere-sigterm",
                     daemon=True).start()


def worker_init(worker_id: int, parent: int | None = None) -> None:
    """``worker_init_fn`` for every DataLoader of the project (training, shards, evaluation); ``parent``: the
    training process's pid (default: the parent process)."""
    ignore_job_signals(parent)
