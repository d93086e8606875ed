"""``pipe:CMD`` shards: CMD runs under ``sh -c`` and its stdout is read as the tar stream, and it ends with the
loader worker that started it.

A loader worker ignores SIGUSR1/SIGINT and blocks SIGTERM (``worker_signals.py``); a child inherits ignored
dispositions and the signal mask across ``exec``, so a plain ``Popen`` (``webdataset.gopen``) would start a
command deaf to SIGTERM that outlives the run (orphaned once the worker is gone). Here the child gets the default
handling of those signals back and an empty mask, runs in its own process group (CMD's own children, e.g.
``curl | zcat``, included), and gets SIGTERM from the kernel if the worker dies in any way (``PR_SET_PDEATHSIG``,
Linux). Every group still running is ended (``killpg`` SIGTERM) when the stream is closed early and when the
worker ends (``end_all``: called by ``worker_signals`` on the training process's SIGTERM and by ``workers.py``
when the training process is gone).
"""
from __future__ import annotations

import os
import signal
import subprocess

_GROUPS: set[int] = set()  # process groups of this process's running pipe commands
_RESET = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _child_setup() -> None:
    """In the child, between fork and exec: default signal handling, nothing blocked, own process group,
    SIGTERM when the parent dies."""
    for sig in _RESET:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    os.setpgid(0, 0)
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_all() -> None:
    """SIGTERM every pipe command (process group) this process started that is still registered."""
    for pgid in list(_GROUPS):
        _kill_group(pgid)
        _GROUPS.discard(pgid)


class PipeStream:
    """A readable binary stream of ``sh -c CMD``'s stdout. At EOF a non-zero exit (other than 141, SIGPIPE)
    raises ``OSError`` naming the command; ``close`` before the command ended ends its process group."""

    def __init__(self, cmd: str, bufsize: int = 1 << 16):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, bufsize=bufsize,
                                     preexec_fn=_child_setup)  # noqa: PLW1509 - signal reset needs it
        _GROUPS.add(self.proc.pid)  # the shell leads its own group: pgid == pid

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and (n is None or n != 0):
            rc = self.proc.wait()
            _GROUPS.discard(self.proc.pid)
            if rc not in (0, 141, -signal.SIGPIPE):
                raise OSError(f"pipe:{self.cmd}: exit status {rc}")
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc.pid)
        self.proc.stdout.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _GROUPS.discard(self.proc.pid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
