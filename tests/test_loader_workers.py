"""Training loaders' workers (``data/workers.py``): started once per loader from a forkserver, reused by every
epoch with the exact batches of main-process loading (the reference: same order, same per-sample augmentation
of (seed, epoch, index), same resume position), signals ignored, and a stalled worker turned into an error that
names the worker and the data."""
import os
import signal
import threading
import time

import pytest
import torch
from torch.utils.data import get_worker_info

from sere_scale.data.loader import FolderLoader
from sere_scale.data.transform import SSLTransform
from sere_scale.data.workers import LoaderTimeout, start_method
from tests.conftest import digits_subset
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def data20(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data20"), 2, 10)


def transform(tmp):
    return SSLTransform.from_config(tiny_config(tmp, tmp))


def batches(it) -> list:
    return [(b["labels"].tolist(), [c.clone() for c in b["crops"]], b["masks"].clone()) for b in it]


def same(a, b) -> bool:
    return len(a) == len(b) and all(la == lb and all(torch.equal(x, y) for x, y in zip(ca, cb)) and torch.equal(ma, mb)
                                    for (la, ca, ma), (lb, cb, mb) in zip(a, b))


def test_workers_start_once_and_serve_every_epoch_and_resume_exactly(data20, tmp_path):
    assert start_method() in ("forkserver", "spawn")
    tf = transform(tmp_path)
    ref = FolderLoader(str(data20), tf, 4, 1, 2, seed=3, num_workers=0)  # main-process loading
    ld = FolderLoader(str(data20), tf, 4, 1, 2, seed=3, num_workers=2)
    assert ld.batches_per_epoch == 2
    try:
        seen_pids = set()
        epochs = {}
        for epoch in (0, 1, 2, 1):
            want = batches(ref.epoch_iter(epoch))
            got = batches(ld.epoch_iter(epoch))
            assert same(got, want), epoch
            epochs[epoch] = want
            pids = list(ld.workers.pids)
            assert all(p > 0 for p in pids) and len(pids) == 2
            seen_pids.update(pids)
        assert len(seen_pids) == 2  # the same two workers for all four epochs
        assert not same(epochs[0], epochs[1])  # the epoch reaches the workers' augmentation seeds
        # resume at (epoch 2, batch 1), also after an epoch left half-read
        part = ld.epoch_iter(0)
        next(part)
        assert same(batches(ld.epoch_iter(2, 1)), epochs[2][1:])
        assert same(batches(ld.epoch_iter(2, 1)), batches(ref.epoch_iter(2, 1)))
        for pid in seen_pids:  # the job's signals never reach the workers (worker_signals.py)
            with open(f"/proc/{pid}/status") as f:
                st = {k: int(v.split()[0], 16) for k, v in (ln.split(":", 1) for ln in f) if k in ("SigIgn", "SigBlk")}
            for sig in (signal.SIGUSR1, signal.SIGINT):  # ignored
                assert st["SigIgn"] & (1 << (sig - 1)), (pid, sig)
            # SIGTERM blocked in the worker's main thread (a thread takes it with sigwaitinfo, and obeys only the
            # training process's own, the one multiprocessing sends at exit)
            assert st["SigBlk"] & (1 << (signal.SIGTERM - 1)), pid
            # and their parent, the forkserver, is deaf to them too: a job-wide SIGTERM killing it mid-fork would
            # take every worker (and so the run) down before the preemption checkpoint
            with open(f"/proc/{pid}/status") as f:
                ppid = int(next(ln for ln in f if ln.startswith("PPid:")).split()[1])
            assert ppid != os.getpid()
            with open(f"/proc/{ppid}/status") as f:
                blk = int(next(ln for ln in f if ln.startswith("SigBlk:")).split()[1], 16)
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                assert blk & (1 << (sig - 1)), ("forkserver", ppid, sig)
        assert set(ld.workers.pids) == seen_pids
    finally:
        ld.close()


class StallInWorker1:
    """A transform that never returns in worker 1 (the test hook for a stalled worker)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, img):
        wi = get_worker_info()
        if wi is not None and wi.id == 1:
            time.sleep(3600)
        return self.inner(img)


def test_a_stalled_worker_times_out_with_an_error_naming_the_worker_and_the_data(data20, tmp_path):
    warm = FolderLoader(str(data20), transform(tmp_path), 4, 0, 2, seed=0, num_workers=1)
    next(warm.epoch_iter(0))  # the forkserver is up (its imports take seconds): the timeout measures the stall
    warm.close()
    ld = FolderLoader(str(data20), StallInWorker1(transform(tmp_path)), 4, 0, 2, seed=0, num_workers=2,
                      worker_timeout_s=20)
    it = ld.epoch_iter(3)
    next(it)  # batch 0 comes from worker 0
    with pytest.raises(LoaderTimeout) as e:
        next(it)  # batch 1 is worker 1's
    msg = str(e.value)
    pid1 = ld.workers.pids[1]
    assert "data.worker_timeout_s=20 s" in msg and "batch 1 of epoch 3" in msg, msg
    assert f"image folder '{data20}'" in msg and f"worker 1 (pid {pid1}: S (sleeping))" in msg, msg
    assert "worker 0 (pid" in msg
    for _ in range(50):  # the stalled worker is killed, not left behind
        if not os.path.exists(f"/proc/{pid1}") or "Z (zombie)" in open(f"/proc/{pid1}/status").read():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {pid1} still alive")
    ld.close()


def test_the_worker_timeout_is_a_validated_config_key():
    from sere_scale.config.load import ConfigError, load_config
    assert load_config(None, []).data.worker_timeout_s == 600
    with pytest.raises(ConfigError, match="data.worker_timeout_s"):
        load_config(None, ["data.worker_timeout_s=-1"])


TRAINER = """import sys, time
from sere_scale.data.loader import FolderLoader
from sere_scale.data.transform import SSLTransform
from tests.tiny import tiny_config
if __name__ == "__main__":
    root = sys.argv[1]
    ld = FolderLoader(root, SSLTransform.from_config(tiny_config(root, root)), 4, 0, 1, 0, 2)
    it = ld.epoch_iter(0)
    next(it), next(it)  # a batch from each worker: both have started
    print(*ld.workers.pids, flush=True)
    time.sleep(600)
"""


def test_workers_and_their_forkserver_end_when_the_training_process_is_killed(data20, tmp_path):
    """SIGKILL leaves the workers no signal to see (and they ignore SIGTERM): they must notice by themselves."""
    import subprocess
    import sys
    from tests.conftest import subprocess_env
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    p = subprocess.Popen([sys.executable, str(script), str(data20)], env=subprocess_env(), stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    guard = threading.Timer(300, lambda: os.killpg(p.pid, signal.SIGKILL))  # never a stuck CI
    guard.start()
    try:
        pids = [int(x) for x in p.stdout.readline().split()]
        assert len(pids) == 2 and all(pids), pids
        with open(f"/proc/{pids[0]}/stat") as f:
            forkserver = int(f.read().rsplit(")", 1)[1].split()[1])  # the workers' parent
        assert forkserver != p.pid
        p.kill()
        p.wait()
        procs = [*pids, forkserver]
        for _ in range(300):
            alive = [q for q in procs if os.path.exists(f"/proc/{q}") and
                     "Z (zombie)" not in open(f"/proc/{q}/status").read()]
            if not alive:
                break
            time.sleep(0.1)
        assert not alive, f"left behind: {alive}"
    finally:
        guard.cancel()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
