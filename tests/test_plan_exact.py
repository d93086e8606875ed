"""``sere-scale plan`` is exact where it can be: the bytes per collective type of one traced step (one process,
fake process group of 2 ranks) equal those counted on a real 2-rank gloo run of the same config, and the traced
model-state bytes per rank equal the sizes of the tensors the real ranks hold; DDP, FSDP2 full and hybrid.
One torchrun launch for all cases (tests/dist/plan_run.py), started first and traced alongside."""
import json
import math
import subprocess
import sys

import pytest

from sere_scale.config.load import load_config
from sere_scale.plan.comm import bytes_by_type
from sere_scale.plan.trace import trace_step
from tests.conftest import ROOT, subprocess_env
from tests.procs import kill_tree
from tests.tiny import TINY

pytestmark = pytest.mark.slow

CASES = {
    "ddp": ["engine.backend=ddp"],
    "fsdp_full": ["engine.backend=fsdp", "engine.fsdp_strategy=full"],
    # 2 ranks, one per "node": sharded within a node of 1, replicated across 2 (HSDP's all-reduce path)
    "fsdp_hybrid": ["engine.backend=fsdp", "engine.fsdp_strategy=hybrid", "engine.fsdp_node_size=1"],
}
WORLD = 2


def overrides(name):
    return [*TINY, "data.path=unused", *CASES[name]]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real 2-rank launch, started here and collected on first use (watchdog: 400 s, then the launch's
    whole process tree is killed)."""
    tmp = tmp_path_factory.mktemp("plan_real")
    jobs, report = tmp / "jobs.json", tmp / "report.json"
    jobs.write_text(json.dumps([{"name": n, "overrides": overrides(n)} for n in CASES]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(ROOT / "tests" / "dist" / "plan_run.py"), str(report), str(jobs)]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = {}

    def get():
        if not result:
            try:
                out = proc.communicate(timeout=400)[0]
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                pytest.fail("the 2-rank launch did not finish in 400 s")
            assert proc.returncode == 0, out[-4000:]
            result.update(json.loads(report.read_text()))
        return result
    yield get
    if proc.poll() is None:
        kill_tree(proc.pid)


@pytest.fixture(scope="module")
def traced(real):
    """The plan's traces, run while the launch works."""
    return {n: trace_step(load_config(None, overrides(n)), WORLD) for n in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_planned_collective_bytes_equal_a_real_two_rank_run(name, traced, real):
    planned = bytes_by_type(traced[name].calls)
    for rank, got in enumerate(real()[name]):
        assert planned == got["comm_bytes"], (name, rank, planned, got["comm_bytes"])


@pytest.mark.parametrize("name", list(CASES))
def test_planned_model_states_equal_the_tensors_rank0_holds(name, traced, real):
    held = {k: v for k, v in traced[name].held.items() if k != "ddp_buckets"}
    assert held == real()[name][0]["held"]
    # rank 1 holds the second dim-0 chunks: no more than rank 0's (padded) pieces
    assert all(real()[name][1]["held"][k] <= v for k, v in held.items())


def _trainable_shapes():
    import torch

    from sere_scale.run.startup import build_model
    with torch.device("meta"):
        student, _, _ = build_model(load_config(None, overrides("ddp")))
    return [tuple(p.shape) for p in student.parameters() if p.requires_grad]


def test_real_counts_match_the_hand_formulas(real):
    """Independent references for the real counts: DDP all-reduces every trainable fp32 gradient once; FSDP2
    reduce-scatters every trainable gradient padded to dim-0 chunks of ceil(d0 / W) rows (its documented
    sharding), and rank 0 holds the first chunk of each parameter of the student and of the teacher."""
    shapes = _trainable_shapes()
    numel = sum(math.prod(s) for s in shapes)
    padded = sum(math.ceil(s[0] / WORLD) * WORLD * math.prod(s[1:]) for s in shapes)
    rank0 = sum(math.ceil(s[0] / WORLD) * math.prod(s[1:]) for s in shapes)
    r = real()
    small = r["fsdp_full"][0]["comm_bytes"]["all_reduce"]  # the method's and the step's own all-reduces
    assert r["ddp"][0]["comm_bytes"]["all_reduce"] == 4 * numel + small
    assert r["fsdp_full"][0]["comm_bytes"]["reduce_scatter"] == 4 * padded
    assert r["fsdp_full"][0]["held"]["student_params"] == 4 * rank0
    assert r["fsdp_full"][0]["held"]["gradients"] == 4 * rank0
