"""``pipe:`` shard commands end with the loader worker that started them (issue 23, item 7). Reproduction: a
worker stuck reading ``pipe:`` of a command that never writes; the run ends (the training process's SIGTERM to
its worker at exit, or the training process gone, as after the hang watchdog's exit): the command's whole
process group is gone too, and while it ran it had the default signal handling (not the worker's ignored and
blocked job signals)."""
import os
import signal
import subprocess
import sys
import time

import pytest

WORKER = r'''
import sys
from sere_scale.data.worker_signals import ignore_job_signals
from sere_scale.data.workers import _exit_with
from sere_scale.data.shardread import iter_piece
ignore_job_signals()  # as a loader worker: SIGUSR1/SIGINT ignored, SIGTERM blocked (obeyed from the parent)
if len(sys.argv) > 2:
    _exit_with(int(sys.argv[2]), every_s=0.2)  # the training process's pid
list(iter_piece("pipe:echo $$ > " + sys.argv[1] + "; sleep 1000 | cat", 0, 1, lambda j: True))
'''
SIGS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _status(pid: int) -> dict:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _group(pgid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.getpgid(int(d)) == pgid and _status(int(d))["State"][0] != "Z":
                    out.append(int(d))
            except (ProcessLookupError, FileNotFoundError, KeyError):
                pass
    return out


def _wait(cond, timeout=20.0):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, PR_SET_PDEATHSIG")
@pytest.mark.parametrize("how", ["sigterm_from_the_training_process", "training_process_gone"])
def test_a_pipe_command_ends_with_its_worker(tmp_path, how):
    pidfile = tmp_path / "pid"
    trainer = subprocess.Popen(["sleep", "1000"]) if how == "training_process_gone" else None
    args = [sys.executable, "-c", WORKER, str(pidfile)] + ([str(trainer.pid)] if trainer else [])
    worker = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        _wait(lambda: pidfile.exists() and pidfile.read_text().strip())
        shell = int(pidfile.read_text())
        _wait(lambda: len(_group(shell)) >= 3)  # sh, sleep, cat
        assert os.getpgid(shell) == shell != os.getpgid(worker.pid)  # its own process group
        for pid in _group(shell):
            st = _status(pid)
            for sig in SIGS:  # default handling: neither ignored nor blocked
                bit = 1 << (sig - 1)
                assert not int(st["SigIgn"], 16) & bit and not int(st["SigBlk"], 16) & bit, (pid, sig, st)
        if trainer is None:
            worker.send_signal(signal.SIGTERM)  # from its parent, as Process.terminate at the run's end
        else:
            trainer.kill()
            trainer.wait()
        worker.wait(timeout=20)
        _wait(lambda: not _group(shell))
    finally:
        for p in (worker, trainer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
