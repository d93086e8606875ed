"""The traces of one plan run side by side, one per CPU core.

Each trace (``trace.trace_step``) is one ``train_step`` in its own fake world of N ranks, independent of the
others, and single-threaded (Python dispatch of fake tensors): a plan of every backend (five traces at the
configured batch) takes the sum of their times in one process, about half of it on two cores. Workers come from
a fork server (``forkserver``; ``spawn`` where there is none), never from a plain ``fork`` of this process: the
caller may hold threads (torch's intra-op pool, gloo, a data loader, a test runner), and a child forked while
one of them holds a lock waits on it forever (seen: the suite hung 12 minutes in a forked trace worker). The
fork server imports the planner once (``PRELOAD``, when this process starts the server; a server the data
loader started first is reused) and forks each worker from its single thread; each worker restores the default
handling of the job's signals (that server's are held), sets torch to one thread, runs whole traces and sends
back their results (``Trace``, ``ZeroLayout``: plain data). With one process, or one job, the traces run here,
in order; the results are the same either way.
"""
from __future__ import annotations

import multiprocessing
import os


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _worker_init() -> None:
    """One torch thread, and the default handling of the job's signals: the fork server may be one that the data
    loader started in this process, deaf to SIGTERM by design (data/workers.py), and a worker that inherits that
    would outlive ``Pool.terminate`` (the pool's exit would wait for it forever)."""
    import signal

    import torch
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    torch.set_num_threads(1)


def _run(job):
    fn, args = job
    return fn(*args)


PRELOAD = ["torch", "sere_scale.plan.trace", "sere_scale.plan.planner"]


def _context():
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)  # no effect when this process's fork server already runs
        return ctx
    return multiprocessing.get_context("spawn")


def run_jobs(jobs: list, processes: int | None = None) -> list:
    """``[fn(*args) for fn, args in jobs]``, computed by up to ``processes`` worker processes (default: one per
    core); ``fn`` must be a module-level function and the jobs picklable. The longest jobs should come first
    (each worker takes the next job when it is done)."""
    n = min(len(jobs), processes or cpu_cores())
    if n <= 1:
        return [_run(j) for j in jobs]
    with _context().Pool(n, initializer=_worker_init) as pool:
        return pool.map(_run, jobs, chunksize=1)
