"""A long run never hangs or dies unsaved: preemption by SIGTERM, the hang watchdog, rank failure (issue 13).

2 ranks on gloo, DDP, loader workers on (``data.num_workers=2``), 12 steps, checkpoints every 3 steps. Five
interrupted launches run side by side, then one launch resumes three of them next to the uninterrupted
reference run, and every loss curve must equal the reference's:

* SIGTERM to the torchrun agent (it forwards to each worker's process group with ``killpg``: ranks and their
  loader workers) → every rank checkpoints and exits 124, ``REQUEUE`` is written;
* SIGTERM to every process of the job at once (agent, ranks, loader workers: what Slurm and Kubernetes do),
  once after a logged step and once as soon as the loader workers are up (during the first step);
* ``slurm/train_srun.sbatch`` (srun/scontrol stubbed) with rank 1 stopped by SIGSTOP: rank 0's hang watchdog
  writes the stacks and exits 125, the template requeues;
* kill -9 of rank 1 under ``torchrun --max-restarts=1``: the restarted group resumes by itself.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sere_scale.engine.checkpoint import find_latest
from sere_scale.run.metrics import read_metrics
from sere_scale.run.watchdog import EXIT_HANG, GRACE
from tests.conftest import ROOT, digits_subset
from tests.procs import descendants, kill_tree, signal_all, torchrun_ranks
from tests.test_engines import _free_port, assert_same_curve, env, overrides, run_jobs, torchrun

RUN = ["data.num_workers=2", "train.epochs=4", "train.max_steps=12"]  # 3 steps per epoch, 3 epoch boundaries
TOTAL = 12
HANG_S = 20  # train.hang_timeout_s of the stalled run
CLI_RC = str(ROOT / "tests" / "dist" / "cli_rc.py")


def _wait(cond, p: subprocess.Popen, log: Path, timeout: float, what: str):
    t0 = time.time()
    while not cond():
        assert p.poll() is None, f"exited ({p.returncode}) before {what}:\n{log.read_text()[-4000:]}"
        assert time.time() - t0 < timeout, f"no {what} in {timeout} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


class Launch:
    """A command in a session of its own, output to a log; ``finish`` waits, then kills whatever is left."""

    def __init__(self, cmd, log: Path, environ=None):
        self.log = log
        self._f = log.open("w")
        self.p = subprocess.Popen(cmd, env=environ or env(), stdout=self._f, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def finish(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"launch still running after {timeout} s:\n{self.log.read_text()[-4000:]}")
        finally:
            kill_tree(self.p.pid)
            self.p.wait()
            self._f.close()


def _workers_up(agent: int, pid_dir: Path) -> bool:
    """Both ranks and their 4 loader workers have started (each worker touches a file in ``pid_dir``,
    data/workers.py; a process count would also see each rank's forkserver and resource tracker)."""
    return len(torchrun_ranks(agent)) == 2 and len(os.listdir(pid_dir)) >= 4


def _sigterm(tmp: Path, data, name: str, everyone: bool, first_step: bool = False) -> dict:
    """SIGTERM to the agent or to every process of the launch, once a step is logged (``first_step``: as soon
    as the loader workers of both ranks are up, before the first step ends)."""
    run, rc_log = tmp / name, tmp / f"{name}.rc"
    e = env()
    e["RC_LOG"] = str(rc_log)
    pid_dir = tmp / f"{name}.workers"
    pid_dir.mkdir()
    e["SERE_WORKER_PID_DIR"] = str(pid_dir)
    job = Launch(torchrun(2, CLI_RC, "train", *overrides(run, data, "ddp", *RUN)), tmp / f"{name}.log", e)
    _wait(lambda: (first_step or read_metrics(run)) and _workers_up(job.p.pid, pid_dir), job.p, job.log, 300,
          "workers")
    tree = descendants(job.p.pid)  # agent, 2 ranks, their forkservers and resource trackers, 4 loader workers
    signal_all(tree if everyone else [job.p.pid], signal.SIGTERM)
    rc = job.finish(300)
    return {"run": run, "rc": rc, "rank_rc": sorted(rc_log.read_text().split("\n")[:-1]) if rc_log.exists() else [],
            "n_signalled": len(tree), "log": job.log.read_text(), **_run_state(run)}


def _run_state(run: Path) -> dict:
    """What an interrupted run left, read before the resume launch clears the markers."""
    marker = {m: (run / m).read_text() if (run / m).exists() else None for m in ("REQUEUE", "HANG")}
    return {"markers": marker, "latest": find_latest(run).name, "last_logged": read_metrics(run)[-1]["step"]}


def _hang(tmp: Path, data) -> dict:
    """slurm/train_srun.sbatch with stubs; SIGSTOP on rank 1 once the step-3 checkpoint exists."""
    run, stub_log = tmp / "hang", tmp / "hang_stub.log"
    e = env()
    e.update(PATH=f"{ROOT / 'tests' / 'dist' / 'slurm_stub'}{os.pathsep}{e['PATH']}", STUB_LOG=str(stub_log),
             SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_JOB_ID="4343", SLURM_JOB_NODELIST="localhost",
             MASTER_PORT=str(_free_port()), PYTHON=sys.executable)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        e.pop(k, None)
    job = Launch(["bash", str(ROOT / "slurm" / "train_srun.sbatch"), "/dev/null",
                  *overrides(run, data, "ddp", *RUN, f"train.hang_timeout_s={HANG_S}")], tmp / "hang.log", e)
    _wait(lambda: (run / "checkpoints" / "latest").exists(), job.p, job.log, 300, "checkpoint")
    pids = {int(ln.split()[1]): int(ln.split()[2]) for ln in stub_log.read_text().splitlines()
            if ln.startswith("pid")}
    os.kill(pids[1], signal.SIGSTOP)
    t_stop = time.time()
    _wait(lambda: "rc 0 " in stub_log.read_text(), job.p, job.log, GRACE * HANG_S + 120, "exit of rank 0")
    fired_after = time.time() - t_stop
    os.kill(pids[1], signal.SIGKILL)  # what srun --kill-on-bad-exit=1 does to the other tasks
    rc = job.finish(120)
    return {"run": run, "rc": rc, "stub": stub_log.read_text().splitlines(), "fired_after": fired_after,
            "log": job.log.read_text(), **_run_state(run)}


def _restart(tmp: Path, data) -> dict:
    """kill -9 of rank 1 under --max-restarts=1 once the step-3 checkpoint exists."""
    run = tmp / "restart"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "-m", "sere_scale", "train", *overrides(run, data, "ddp", *RUN)]
    job = Launch(cmd, tmp / "restart.log")
    _wait(lambda: (run / "checkpoints" / "latest").exists(), job.p, job.log, 300, "checkpoint")
    ranks = torchrun_ranks(job.p.pid)
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = read_metrics(run)[-1]["step"]
    rc = job.finish(400)
    return {"run": run, "rc": rc, "killed_at": killed_at, "log": job.log.read_text()}


@pytest.fixture(scope="module")
def launches(tmp_path_factory, digits_root):
    tmp = tmp_path_factory.mktemp("preempt")
    data = digits_subset(digits_root, tmp / "data48", 3, 16)
    work = {"agent": lambda: _sigterm(tmp, data, "agent", everyone=False),
            "everyone": lambda: _sigterm(tmp, data, "everyone", everyone=True),
            "first_step": lambda: _sigterm(tmp, data, "first_step", everyone=True, first_step=True),
            "hang": lambda: _hang(tmp, data), "restart": lambda: _restart(tmp, data)}
    out, errors = {}, {}

    def one(name):
        try:
            out[name] = work[name]()
        except BaseException as e:  # noqa: BLE001 - reported below with the launch's name
            errors[name] = e
    threads = [threading.Thread(target=one, args=(n,)) for n in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, e in errors.items():
        raise AssertionError(f"launch '{name}' failed: {e}") from e
    # one launch: the uninterrupted reference, then the three interrupted runs resumed
    jobs = [{"name": "ref", "overrides": overrides(tmp / "ref", data, "ddp", *RUN)}]
    jobs += [{"name": n, "overrides": overrides(out[n]["run"], data, "ddp", *RUN), "resume": True}
             for n in ("agent", "everyone", "first_step", "hang")]
    rep = run_jobs(tmp, 2, jobs)
    return tmp, out, rep


@pytest.mark.parametrize("name", ["agent", "everyone", "first_step"])
def test_sigterm_with_loader_workers_checkpoints_requeues_and_resumes_exactly(launches, name):
    tmp, out, rep = launches
    r = out[name]
    assert "killed by signal" not in r["log"], r["log"][-4000:]
    assert r["n_signalled"] >= 7 or name == "agent"  # agent + 2 ranks + 2 loader workers each
    assert r["rank_rc"] == ["0 124", "1 124"], r["log"][-4000:]  # every rank: checkpoint, then 124
    # torchrun itself, signalled, exits non-zero whatever its workers returned: the templates read REQUEUE
    assert r["rc"] != 0
    step = r["last_logged"]  # the preempted step: logged, checkpointed, named in REQUEUE
    assert 1 <= step < TOTAL and r["markers"]["REQUEUE"].strip() == str(step)
    assert name != "first_step" or step <= 3, step  # a step or so after the signal
    assert r["latest"] == f"step_{step:08d}"
    # resumed: REQUEUE removed, and the whole curve equals the uninterrupted one
    assert rep[name]["step"] == TOTAL and not (r["run"] / "REQUEUE").exists()
    assert len(read_metrics(r["run"])) == TOTAL
    assert_same_curve(tmp / "ref", r["run"], rel=1e-6)


def test_hang_watchdog_dumps_stacks_exits_125_and_the_srun_template_requeues(launches):
    tmp, out, rep = launches
    r = out["hang"]
    assert f"rc 0 {EXIT_HANG}" in r["stub"], r["log"][-4000:]
    assert "scontrol requeue 4343" in r["stub"] and r["rc"] == 0, r["log"][-4000:]
    assert r["fired_after"] <= GRACE * HANG_S + 60, r["fired_after"]
    stacks = (r["run"] / "hang_rank0.txt").read_text()
    waited = float(re.search(r"made no progress for (\d+) s", stacks).group(1))
    assert waited >= HANG_S, stacks[:500]
    assert "Current thread" in stacks and "Thread 0x" in stacks  # every thread: the watchdog's and the rest
    assert re.search(r'File ".*sere_scale/run/train\.py", line \d+ in train', stacks), stacks
    assert "hang watchdog: rank 0" in r["log"] and "sere_scale/run/train.py" in r["log"]  # the log has them too
    assert not (r["run"] / "hang_rank1.txt").exists()  # the stopped rank wrote nothing
    assert r["markers"] == {"REQUEUE": None, "HANG": "rank 0\n"}
    assert r["latest"] in ("step_00000003", "step_00000006", "step_00000009") and r["last_logged"] < TOTAL
    # resumed from the last checkpoint: the HANG marker is cleared and the curve is the uninterrupted one
    assert rep["hang"]["step"] == TOTAL and not (r["run"] / "HANG").exists()
    assert_same_curve(tmp / "ref", r["run"], rel=1e-6)


def test_kill9_of_a_rank_under_max_restarts_resumes_by_itself_and_reproduces_the_curve(launches):
    tmp, out, _ = launches
    r = out["restart"]
    assert r["rc"] == 0, r["log"][-4000:]
    assert "TORCHELASTIC_RESTART_COUNT=1" in r["log"] and "resumed from" in r["log"], r["log"][-4000:]
    assert r["killed_at"] < TOTAL
    assert len(read_metrics(r["run"])) == TOTAL
    assert_same_curve(tmp / "ref", r["run"], rel=1e-6)


WATCHDOG_SCRIPT = r"""
import sys, time
from sere_scale.run.watchdog import HangWatchdog
w = HangWatchdog(1.0, sys.argv[1], rank=3).start()
for step in range(1, 16):  # 3 s of steps 0.2 s apart: never 1 s without one
    time.sleep(0.2)
    w.beat(step)
w.extend("evaluation hooks")
time.sleep(2.0)  # < GRACE x 1 s
w.beat(15)
print("survived", flush=True)
def stalled_here():
    time.sleep(60)
stalled_here()
"""


def test_watchdog_fires_only_without_steps_and_writes_every_threads_stack(tmp_path):
    res = subprocess.run([sys.executable, "-c", WATCHDOG_SCRIPT, str(tmp_path)], env=env(), capture_output=True,
                         text=True, timeout=50)
    assert res.returncode == EXIT_HANG, res.stderr
    assert res.stdout.strip() == "survived"
    stacks = (tmp_path / "hang_rank3.txt").read_text()
    assert "waiting for step 16 (last step completed: 15" in stacks
    assert re.search(r"line \d+ in stalled_here", stacks) and "in _fire" in stacks, stacks
    assert re.search(r"line \d+ in stalled_here", res.stderr)
    assert (tmp_path / "HANG").read_text() == "rank 3\n"


WORKER_SCRIPT = r"""
import os, signal, sys, time
from torch.utils.data import DataLoader, Dataset
from sere_scale.data.worker_signals import worker_init
from tests.procs import children
class Slow(Dataset):
    def __len__(self):
        return 1000
    def __getitem__(self, i):
        time.sleep(0.01)
        return i
it = iter(DataLoader(Slow(), num_workers=1, worker_init_fn=worker_init, multiprocessing_context="fork"))
first = int(next(it))
print(children(os.getpid())[0], flush=True)
sys.stdin.readline()  # meanwhile the job's signals reach the worker
print([int(next(it)) for _ in range(20)] == list(range(first + 1, first + 21)), flush=True)
sys.exit(7)  # the iterator still alive: multiprocessing's exit terminate()s the worker, which must obey
"""


def test_loader_workers_ignore_the_jobs_signals_but_not_their_parents_terminate(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT], env=env(), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        worker = int(p.stdout.readline())
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):  # from outside: the job
            os.kill(worker, sig)
        time.sleep(0.5)
        p.stdin.write("\n")
        p.stdin.flush()
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert out.strip() == "True", err  # the worker survived and kept serving in order
    assert p.returncode == 7, err
    assert not os.path.exists(f"/proc/{worker}") or "Z" in open(f"/proc/{worker}/stat").read().split()[2]


BIRTH_SCRIPT = r"""
import os, signal, time
from torch.utils.data import DataLoader, Dataset
from sere_scale.data.worker_signals import job_signals_held, worker_init
from tests.procs import children
signal.signal(signal.SIGTERM, lambda *a: None)  # the training process's own handler (forked workers inherit it)
class Slow(Dataset):
    def __len__(self):
        return 40
    def __getitem__(self, i):
        time.sleep(0.01)
        return i
me = os.getpid()
if os.fork() == 0:  # another process (the job) sends SIGTERM to each worker the moment it exists
    seen, t0 = set(), time.time()
    while time.time() - t0 < 4:
        for c in set(children(me)) - seen - {os.getpid()}:
            seen.add(c)
            os.kill(c, signal.SIGTERM)
    os._exit(0)
for epoch in range(3):  # a fresh set of workers per epoch
    with job_signals_held():
        it = iter(DataLoader(Slow(), num_workers=2, worker_init_fn=worker_init, multiprocessing_context="fork"))
    assert sorted(int(x) for x in it) == list(range(40))
print("ok", flush=True)
"""


def test_loader_workers_survive_sigterm_from_the_moment_they_are_born():
    res = subprocess.run([sys.executable, "-c", BIRTH_SCRIPT], env=env(), capture_output=True, text=True,
                         timeout=120)
    assert res.stdout.strip() == "ok", res.stderr[-3000:]


def test_timeouts_are_config_keys_and_reach_the_process_group(tmp_path, monkeypatch):
    import datetime

    import torch.distributed as dist

    from sere_scale.run import train as train_module
    from sere_scale.config.load import ConfigError
    from sere_scale.engine.distributed import init_distributed
    from tests.tiny import tiny_config
    for key in ("train.hang_timeout_s", "train.dist_timeout_s"):
        for bad in ("0", "-5", "nan"):
            with pytest.raises(ConfigError, match=re.escape(key)):
                tiny_config(tmp_path, tmp_path, f"{key}={bad}")
    seen = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.update(k))
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    init_distributed("cpu", timeout_s=12.5)
    assert seen["timeout"] == datetime.timedelta(seconds=12.5)

    class Stop(Exception):
        pass

    def fake_init(**kw):
        seen["main_train"] = kw
        raise Stop
    monkeypatch.setattr(train_module, "init_distributed", fake_init)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(Stop):
            train_module.main_train(tiny_config(tmp_path, tmp_path, "train.dist_timeout_s=77"), resume=False)
    finally:  # main_train installed its preemption handlers: give pytest its own back
        for sig, h in handlers.items():
            signal.signal(sig, h)
    assert seen["main_train"] == {"timeout_s": 77.0}


def test_default_timeouts_are_documented():
    from sere_scale.config.load import Config
    t = Config().train
    readme = (ROOT / "README.md").read_text()
    launch = (ROOT / "docs" / "LAUNCH.md").read_text()
    for key, default in (("hang_timeout_s", t.hang_timeout_s), ("dist_timeout_s", t.dist_timeout_s)):
        assert f"`train.{key}`" in readme and f"`train.{key}`" in launch
        assert f"{default:g}" in launch
    assert str(EXIT_HANG) in launch and json.dumps(EXIT_HANG) in readme
