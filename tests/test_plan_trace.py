"""``sere-scale plan``'s tracing shortcuts: FSDP2's chunk views made lazily (``trace._Chunks``) are the views
``torch.chunk`` makes, and traces run in forked workers (``parallel.run_jobs``) come back in order, as computed
in this process."""
import math
import os

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
