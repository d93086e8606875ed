"""``sere-scale plan``'s tracing shortcuts: FSDP2's chunk views made lazily (``trace._Chunks``) are the views
``torch.chunk`` makes, and traces run in worker processes (``parallel.run_jobs``) come back in order, as computed
in this process, and never inherit a lock another thread of the caller holds (a plain fork would: the suite
once hung in a forked trace worker)."""
import math
import os
import threading

import pytest
import torch
from torch.distributed.fsdp._fully_shard._fsdp_common import _chunk_with_empty

from sere_scale.plan.parallel import run_jobs
from sere_scale.plan.trace import _Chunks


@pytest.mark.parametrize("shape, n, dim", [((768,), 512, 0), ((2304, 8), 512, 0), ((7, 3), 4, 0), ((0, 5), 3, 0),
                                           ((0,), 3, 0), ((5, 0), 2, 0), ((1,), 8, 0), ((10, 6), 3, 1),
                                           ((512,), 512, 0), ((513,), 512, 0)])
def test_lazy_chunks_are_torch_chunk_views(shape, n, dim):
    t = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)
    ref, lazy = _chunk_with_empty(t, n, dim), _Chunks(t, n, dim)
    assert len(lazy) == len(ref) == n
    for i in range(n):
        a, b = ref[i], lazy[i]
        assert (a.shape, a.stride(), a.dtype, a.storage_offset()) == (b.shape, b.stride(), b.dtype, b.storage_offset())
        if a.numel():
            assert b.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() and torch.equal(a, b)
    with pytest.raises(IndexError):
        lazy[n]


def test_forked_jobs_come_back_in_order():
    jobs = [(os.getpid, ()), (math.factorial, (20,)), (pow, (3, 5)), (os.getpid, ())]
    pids_and_values = run_jobs(jobs, processes=2)
    assert pids_and_values[1:3] == [math.factorial(20), 3 ** 5]
    assert os.getpid() not in (pids_and_values[0], pids_and_values[3])  # computed in the workers
    serial = run_jobs(jobs, processes=1)
    assert serial[1:3] == pids_and_values[1:3] and serial[0] == serial[3] == os.getpid()


LOCK = threading.Lock()


def _takes_lock() -> bool:
    ok = LOCK.acquire(timeout=5)
    if ok:
        LOCK.release()
    return ok


def test_workers_do_not_inherit_a_lock_held_by_another_thread():
    """A thread of the caller holds a lock while the workers start (as torch's, gloo's or a test runner's threads
    may): each worker must still take it (a child forked from this process would wait on it forever)."""
    held, release = threading.Event(), threading.Event()

    def holder():
        with LOCK:
            held.set()
            release.wait(60)

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    held.wait(10)
    try:
        assert run_jobs([(_takes_lock, ()), (_takes_lock, ())], processes=2) == [True, True]
    finally:
        release.set()
        t.join(10)


SERVER_FIRST = r"""
import math
from sere_scale.data.workers import mp_context
from sere_scale.plan.parallel import run_jobs
mp_context()  # the data loader's fork server, deaf to SIGTERM, started first as in a process that trained
print(run_jobs([(math.factorial, (5,)), (pow, (2, 10)), (abs, (-3,))], processes=2))
"""


def test_workers_end_when_the_data_loaders_fork_server_was_started_first():
    """The fork server is per process: after a data loader started it (SIGTERM held, data/workers.py), trace
    workers forked from it must still end at the pool's exit (the suite once hung there, in Pool.terminate)."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env
    out = subprocess.run([sys.executable, "-c", SERVER_FIRST], env=subprocess_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[120, 1024, 3]"
