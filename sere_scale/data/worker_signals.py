"""Loader worker processes leave the job's signals to the training process.

Slurm, Kubernetes and torchrun's agent (which forwards with ``killpg``) deliver SIGTERM/SIGUSR1/SIGINT to every
process of the job, DataLoader workers included. A worker killed by one makes the training process fail
("DataLoader worker ... is killed by signal") before it can write its preemption checkpoint, so workers ignore
them: the training process finishes its step, checkpoints and shuts its workers down itself.
"""
from __future__ import annotations

import signal

JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def ignore_job_signals() -> None:
    """Ignore SIGTERM, SIGUSR1 and SIGINT in this process (call first thing in a loader worker)."""
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def worker_init(worker_id: int) -> None:
    """``worker_init_fn`` for every DataLoader of the project (training, shards, evaluation)."""
    ignore_job_signals()
