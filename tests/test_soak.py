"""Soak: 2 ranks (torchrun, gloo) with 2 loader workers each cross 200 epoch boundaries (one batch per epoch,
tiny model) and finish; each rank started exactly its 2 workers (not a set per epoch), and none outlives the
run. A hang cannot stall CI: every process of the launch (ranks, forkservers, workers) dumps its threads'
stacks after ``DUMP_S`` (faulthandler, armed by a sitecustomize on the children's path), then the whole
process group is killed and the test fails with the output."""
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from sere_scale.data.workers import PID_DIR_ENV
from sere_scale.run.metrics import read_metrics
from tests.conftest import digits_subset, subprocess_env
from tests.tiny import tiny_overrides

EPOCHS, WORKERS = 201, 2
DUMP_S, KILL_S = 420, 480  # generous: CI machines are slow and shared; an idle 2-core machine needs ~40 s
HOOK = """import faulthandler, os, sys
if os.environ.get("SERE_TEST_DUMP_S"):
    faulthandler.dump_traceback_later(float(os.environ["SERE_TEST_DUMP_S"]), file=sys.stderr)
"""


def test_two_ranks_with_workers_cross_200_epoch_boundaries_with_one_set_of_workers(tmp_path, digits_root):
    data = digits_subset(digits_root, tmp_path / "data", 1, 4)  # 4 images, 2 per rank: one batch of 2 per epoch
    hook, pids, run = tmp_path / "hook", tmp_path / "pids", tmp_path / "run"
    hook.mkdir()
    pids.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    env = subprocess_env(SERE_TEST_DUMP_S=str(DUMP_S), **{PID_DIR_ENV: str(pids)})
    env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
    args = tiny_overrides(run, data, "data.batch_size=2", f"data.num_workers={WORKERS}", "data.n_local=0",
                          f"train.epochs={EPOCHS}", "optim.warmup_epochs=1", "image_loss.warmup_teacher_temp_epochs=1",
                          "train.log_every=50", "checkpoint.every_steps=100000")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sere_scale", "train", *args]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=KILL_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"the soak run hung (stacks dumped after {DUMP_S} s):\n{out[-20000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, out[-8000:]
    rows = read_metrics(run)
    assert rows and rows[-1]["step"] == EPOCHS and rows[-1]["epoch"] >= EPOCHS - 1, rows[-1:]
    started = Counter(f.name.split("-")[0] for f in pids.iterdir())
    assert started == {"0": WORKERS, "1": WORKERS}, started  # once per run, not per epoch
    for _ in range(100):  # and gone with the run
        alive = [f.name for f in pids.iterdir() if _alive(int(f.name.split("-")[1]))]
        if not alive:
            break
        time.sleep(0.1)
    assert not alive, alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "Z (zombie)" not in f.read()
    except OSError:
        return False
