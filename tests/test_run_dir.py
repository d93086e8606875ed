"""A run directory belongs to one run: fresh runs refuse a used folder (or move it aside), one writer at a time
(a lock with host and pid; stale locks taken over), pruning and ``find_latest`` see only this run's checkpoints,
and a refused start writes nothing."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sere_scale.engine.checkpoint import CheckpointManager, find_latest
from sere_scale.config.load import ConfigError
from sere_scale.run.metrics import read_metrics
from sere_scale.run.rundir import LOCK, RunLock, stale_reason
from sere_scale.run.train import train
from tests.conftest import digits_subset, subprocess_env
from tests.tiny import tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_fresh_run_refuses_a_used_folder_and_move_old_moves_it_aside(tmp_path, small_data):
    run = tmp_path / "run"
    train(tiny_config(run, small_data, "train.max_steps=6", "checkpoint.keep=1"))
    before = snapshot(run)
    with pytest.raises(ConfigError, match="--resume.*--move-old"):
        train(tiny_config(run, small_data, "train.max_steps=3", "model.depth=1"))
    assert snapshot(run) == before  # nothing written: config.yaml, metrics, checkpoints, tb untouched
    # told to: the old run is moved aside whole, the new one starts in an empty folder
    train(tiny_config(run, small_data, "train.max_steps=3", "checkpoint.keep=1"), move_old=True)
    assert snapshot(tmp_path / "run.old-1") == before
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]
    assert find_latest(run).name == "step_00000003" and not (run / LOCK).exists()


def test_a_refused_resume_leaves_the_folder_unchanged(tmp_path, small_data):
    run = tmp_path / "run"
    train(tiny_config(run, small_data, "train.max_steps=3"))
    (run / "REQUEUE").write_text("3\n")
    before = snapshot(run)
    with pytest.raises(ConfigError, match="'model.depth'.*2.*3"):
        train(tiny_config(run, small_data, "train.max_steps=6", "model.depth=3"), resume=True)
    assert snapshot(run) == before


class _Engine:
    """Just enough of an engine for CheckpointManager: one file per checkpoint."""
    name = "ddp"

    class info:
        world_size = 1

    def save(self, d, state):
        Path(d, "model.pt").write_text(json.dumps(state))


def test_pruning_and_find_latest_see_only_this_runs_checkpoints(tmp_path):
    other = CheckpointManager(tmp_path, keep=5, meta={"run_id": "old"})
    for step in (50, 60):
        other.save(_Engine(), {"step": step})
    mine = CheckpointManager(tmp_path, keep=2, meta={"run_id": "new"})
    for step in (1, 2, 3):
        mine.save(_Engine(), {"step": step})
        ptr = (tmp_path / "checkpoints" / "latest").read_text()
        assert (tmp_path / "checkpoints" / ptr / "meta.json").exists()  # latest never names a missing folder
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_00000002", "step_00000003", "step_00000050", "step_00000060"]
    assert mine.latest().name == "step_00000003" and find_latest(tmp_path, "new").name == "step_00000003"
    assert find_latest(tmp_path, "old").name == "step_00000060"


def test_a_stale_lock_rule_covers_dead_holders_and_restarts_of_the_same_job(tmp_path, monkeypatch):
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = {"host": host, "pid": os.getpid(), "slurm_job": "", "elastic_run": "", "restart": [0, 0]}
    assert "no longer running" in stale_reason({"host": host, "pid": dead.pid}, me)
    assert stale_reason({"host": host, "pid": os.getppid()}, me) is None  # alive: held
    assert stale_reason({"host": "elsewhere", "pid": dead.pid}, me) is None  # cannot tell: held
    # a torchrun --max-restarts restart (or slurm requeue) of the same job takes over its earlier attempt's lock
    restarted = {**me, "slurm_job": "77", "elastic_run": "rdzv", "restart": [0, 1]}
    earlier = {"host": "node-a", "pid": os.getppid(), "slurm_job": "77", "elastic_run": "rdzv", "restart": [0, 0]}
    assert "earlier attempt" in stale_reason(earlier, restarted)
    requeued = {**me, "slurm_job": "77", "elastic_run": "other", "restart": [1, 0]}  # slurm requeue, new rdzv id
    assert "earlier attempt" in stale_reason({**earlier, "restart": [0, 3]}, requeued)
    assert stale_reason({**earlier, "slurm_job": "78", "elastic_run": "x"}, restarted) is None  # another job
    assert stale_reason({**earlier, "restart": [0, 1]}, restarted) is None  # a peer of the same attempt
    # acquire: a dead holder's lock is taken over (with a warning), a live one refused with host and pid
    (tmp_path / LOCK).write_text(json.dumps({"host": host, "pid": dead.pid, "time": 0}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(json.dumps({"host": host, "pid": os.getppid(), "time": 0}))
    with pytest.raises(ConfigError, match=f"host {host}, pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "rdzv")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    (tmp_path / LOCK).write_text(json.dumps({"host": "node-a", "pid": 1, "elastic_run": "rdzv", "restart": [0, 0]}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.held


def _cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "sere_scale", "train", *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_two_runs_at_once_one_is_refused_then_a_dead_holders_lock_is_taken_over(tmp_path, small_data):
    run = tmp_path / "run"
    args = tiny_overrides(run, small_data, "train.epochs=200", "checkpoint.every_steps=2")
    a = subprocess.Popen([sys.executable, "-m", "sere_scale", "train", *args], env=subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not (run / "checkpoints" / "latest").exists():
            assert a.poll() is None, a.stderr.read()[-3000:]
            assert time.time() - t0 < 240, "the first run wrote no checkpoint in time"
            time.sleep(0.2)
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == a.pid and holder["host"] == socket.gethostname()
        others = {tuple(extra): subprocess.Popen([sys.executable, "-m", "sere_scale", "train", *args, *extra],
                                                 env=subprocess_env(), stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.PIPE, text=True)
                  for extra in (["--resume"], [], ["--move-old"])}
        for extra, b in others.items():
            err = b.communicate(timeout=300)[1]
            assert b.returncode == 2, (extra, err[-3000:])
            assert f"pid {a.pid}" in err and "Traceback" not in err, (extra, err[-3000:])
        assert a.poll() is None and not Path(f"{run}.old-1").exists()
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    n_before = len(read_metrics(run))
    b = _cli([*tiny_overrides(run, small_data, "train.max_steps=2", "checkpoint.every_steps=2"), "--resume"])
    assert b.returncode == 0 and "taking over the lock" in b.stderr, b.stderr[-3000:]
    assert not (run / LOCK).exists()
    assert len(read_metrics(run)) <= n_before  # resumed from its checkpoint, already past max_steps=2
