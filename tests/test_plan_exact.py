"""``sere-scale plan`` is exact where it can be: the planned bytes per collective type of one step equal those
counted on a real gloo run of the same config, and the planned model-state bytes per rank equal the sizes of the
tensors the real ranks hold: DDP, FSDP2 full and hybrid (traced: one process, fake process group) and DeepSpeed
ZeRO-1/2/3 (modelled by DeepSpeed's rules from the DDP trace and the model's layout), at 2 and 4 ranks. One
torchrun launch per world size (tests/dist/plan_run.py), both started first and planned alongside.

The ZeRO cases run bf16 (as on the GPUs) with two micro-batches (ZeRO-2/3 reduce at every one); the 4-rank
cases use an iBOT head of 63 outputs, so that parameters of odd size exercise the padding rules (FSDP2's dim-0
chunks, ZeRO-1/2's group alignment to 2 × world elements, ZeRO-3's per-parameter padding)."""
import json
import math
import subprocess
import sys

import pytest

from sere_scale.config.load import load_config
from sere_scale.plan.comm import bytes_by_type
from sere_scale.plan.planner import plan_deepspeed, trace_with_layout
from sere_scale.plan.trace import trace_step
from tests.conftest import ROOT, subprocess_env
from tests.procs import kill_tree
from tests.tiny import TINY

pytestmark = pytest.mark.slow

ZERO = ["train.precision=bf16", "train.grad_accum=2"]
ODD = ["image_loss.out_dim=63"]
CASES = {
    2: {"ddp": ["engine.backend=ddp"],
        "fsdp_full": ["engine.backend=fsdp", "engine.fsdp_strategy=full"],
        # one rank per "node": sharded within a node of 1, replicated across 2 (HSDP's all-reduce path)
        "fsdp_hybrid": ["engine.backend=fsdp", "engine.fsdp_strategy=hybrid", "engine.fsdp_node_size=1"],
        **{f"zero{z}": [*ZERO, "engine.backend=deepspeed", f"engine.zero_stage={z}"] for z in (1, 2, 3)}},
    4: {"ddp": [*ODD, "engine.backend=ddp"],
        "fsdp_full": [*ODD, "engine.backend=fsdp", "engine.fsdp_strategy=full"],
        # 2 "nodes" of 2: sharded within a node (all-gather, reduce-scatter), replicated across (all-reduce)
        "fsdp_hybrid": [*ODD, "engine.backend=fsdp", "engine.fsdp_strategy=hybrid", "engine.fsdp_node_size=2"],
        **{f"zero{z}": [*ODD, "train.precision=bf16", "engine.backend=deepspeed", f"engine.zero_stage={z}"]
           for z in (1, 2, 3)}},
}
WATCHDOG = {2: 420, 4: 600}
PAIRS = [(w, n) for w in CASES for n in CASES[w]]
ZERO_PAIRS = [(w, n) for w, n in PAIRS if n.startswith("zero")]
DIRECT = [(w, n) for w, n in PAIRS if not n.startswith("zero")]


def overrides(world, name):
    return [*TINY, "data.path=unused", *CASES[world][name]]


def ddp_overrides(world, name):
    """The DDP config a ZeRO case is planned from (the same config but the backend)."""
    return [o for o in overrides(world, name) if not o.startswith("engine.")] + ["engine.backend=ddp"]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real launches, started here and collected on first use (watchdog: the launch's whole process tree is
    killed after WATCHDOG seconds)."""
    procs, results = {}, {}
    for world, cases in CASES.items():
        tmp = tmp_path_factory.mktemp(f"plan_real_{world}")
        jobs, report = tmp / "jobs.json", tmp / "report.json"
        jobs.write_text(json.dumps([{"name": n, "overrides": overrides(world, n)} for n in cases]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(ROOT / "tests" / "dist" / "plan_run.py"), str(report), str(jobs)]
        procs[world] = (subprocess.Popen(cmd, env=subprocess_env(DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True), report)

    def get(world):
        if world not in results:
            proc, report = procs[world]
            try:
                out = proc.communicate(timeout=WATCHDOG[world])[0]
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                pytest.fail(f"the {world}-rank launch did not finish in {WATCHDOG[world]} s")
            assert proc.returncode == 0, out[-4000:]
            results[world] = json.loads(report.read_text())
        return results[world]
    yield get
    for proc, _ in procs.values():
        if proc.poll() is None:
            kill_tree(proc.pid)


@pytest.fixture(scope="module")
def planned(real):
    """The plans' bytes per collective type and model states per rank, computed while the launches work:
    traced for DDP/FSDP, ``plan_deepspeed`` on the DDP trace of the same config for ZeRO."""
    out = {}
    for world, name in DIRECT:
        tr = trace_step(load_config(None, overrides(world, name)), world)
        out[world, name] = (bytes_by_type(tr.calls), {k: v for k, v in tr.held.items() if k != "ddp_buckets"})
    ddp = {}
    for world, name in ZERO_PAIRS:
        key = (world, tuple(ddp_overrides(world, name)))
        if key not in ddp:
            ddp[key] = trace_with_layout(load_config(None, list(key[1])), world)
        p = plan_deepspeed(name.replace("zero", "deepspeed:"), *ddp[key], load_config(None, overrides(world, name)),
                           world)
        out[world, name] = (bytes_by_type(p.calls), p.breakdown)
    return out


@pytest.mark.parametrize("world, name", PAIRS)
def test_planned_collective_bytes_equal_a_real_run(world, name, planned, real):
    comm, _ = planned[world, name]
    for rank, got in enumerate(real(world)[name]):
        assert comm == got["comm_bytes"], (world, name, rank, comm, got["comm_bytes"])


@pytest.mark.parametrize("world, name", PAIRS)
def test_planned_model_states_equal_the_tensors_the_ranks_hold(world, name, planned, real):
    _, held = planned[world, name]
    ranks = real(world)[name]
    if name.startswith("zero"):  # DeepSpeed pads every partition to the same size: every rank holds the same
        for rank, got in enumerate(ranks):
            assert held == got["held"], (world, name, rank)
        return
    assert held == ranks[0]["held"]
    # the other ranks hold the later dim-0 chunks: no more than rank 0's (padded) pieces
    assert all(r["held"][k] <= v for r in ranks[1:] for k, v in held.items())


def _trainable_shapes(world, name):
    import torch

    from sere_scale.run.startup import build_model
    with torch.device("meta"):
        student, _, _ = build_model(load_config(None, overrides(world, name)))
    return [tuple(p.shape) for p in student.parameters() if p.requires_grad]


def test_real_counts_match_the_hand_formulas(real):
    """Independent references for the real counts. DDP all-reduces every trainable fp32 gradient once; FSDP2
    reduce-scatters every trainable gradient padded to dim-0 chunks of ceil(d0 / W) rows (its documented
    sharding), and rank 0 holds the first chunk of each parameter of the student and of the teacher. ZeRO
    (DeepSpeed's documented partitioning): ZeRO-2 all-reduces the fp32 gradients at both micro-batches, ZeRO-1
    once; ZeRO-3 reduce-scatters them, each padded to a multiple of W, at both micro-batches, and holds bf16
    partitions of ceil(n / W) elements of each parameter."""
    for world, name in [(2, "fsdp_full"), (4, "fsdp_full")]:
        shapes = _trainable_shapes(world, name)
        numel = sum(math.prod(s) for s in shapes)
        padded = sum(math.ceil(s[0] / world) * world * math.prod(s[1:]) for s in shapes)
        rank0 = sum(math.ceil(s[0] / world) * math.prod(s[1:]) for s in shapes)
        r = real(world)
        small = r["fsdp_full"][0]["comm_bytes"]["all_reduce"]  # the method's and the step's own all-reduces
        assert r["ddp"][0]["comm_bytes"]["all_reduce"] == 4 * numel + small
        assert r["fsdp_full"][0]["comm_bytes"]["reduce_scatter"] == 4 * padded
        assert r["fsdp_full"][0]["held"]["student_params"] == 4 * rank0
        assert r["fsdp_full"][0]["held"]["gradients"] == 4 * rank0
    r, numels = real(2), [math.prod(s) for s in _trainable_shapes(2, "zero3")]
    assert (r["zero2"][0]["comm_bytes"]["all_reduce"] - r["zero1"][0]["comm_bytes"]["all_reduce"]
            == 4 * sum(numels))
    assert r["zero3"][0]["comm_bytes"]["reduce_scatter"] == 2 * 4 * sum(2 * math.ceil(n / 2) for n in numels)
    numels = [math.prod(s) for s in _trainable_shapes(4, "zero3")]
    assert any(n % 4 for n in numels)  # the padding is exercised
    assert real(4)["zero3"][0]["held"]["student_params"] == 2 * sum(math.ceil(n / 4) for n in numels)
