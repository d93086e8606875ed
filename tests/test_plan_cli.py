"""``sere-scale plan``: the time model on hand-worked values, the command's JSON (the issue's format) on the
tiny config, and clear errors on bad input."""
import json

import pytest

from sere_scale.cli import main
from sere_scale.plan.comm import Collective
from sere_scale.plan.estimate import comm_time, scaled_group
from sere_scale.plan.hardware import Links
from tests.tiny import TINY


def test_ring_times_by_hand():
    links = Links(gpus_per_node=8, intra_gbs=400, inter_gbs=50, latency_intra_s=1e-5, latency_inter_s=2e-5)
    world16 = tuple(range(16))
    # 1 GB all-reduce over 16 ranks on 2 nodes: 2·15/16·1e9 B / 50e9 B/s + 2e-5 s · log2(16)
    # (the step's only gradient reduction is its last: exposed)
    over, block, by_type = comm_time([Collective("all_reduce", 10**9, world16)], 16, 16, links)
    assert block == pytest.approx(2 * 15 / 16 * 10**9 / 50e9 + 4 * 2e-5) and over == 0
    # a 1 KiB all-gather inside one node of 8: (7/8)·1024 / 400e9 + 1e-5 · 3, on the critical path
    over, block, _ = comm_time([Collective("all_gather", 1024, tuple(range(8)))], 16, 16, links)
    assert over == 0 and block == pytest.approx(7 / 8 * 1024 / 400e9 + 3e-5)
    # at 512 ranks the world group is the world; HSDP's node group stays 8; its replica group grows to 64
    assert scaled_group(Collective("all_reduce", 1, world16), 16, 512, 8) == (512, True)
    assert scaled_group(Collective("all_gather", 1, tuple(range(8, 16))), 16, 512, 8) == (8, False)
    assert scaled_group(Collective("all_reduce", 1, (3, 11)), 16, 512, 8) == (64, True)


def test_overlap_model_on_a_made_up_plan_by_hand():
    """16 ranks on 2 nodes (50 GB/s, 20 µs per hop between them), compute 0.1 s (5e12 FLOPs at 50 % of 100
    TFLOP/s): a 1 GB all-gather (exposed: the first unit), the 12-byte vote (exposed: latency-bound), a 1 GB
    all-gather and a 2 GB reduce-scatter (overlapped), a last 2 GB reduce-scatter (exposed: after the backward)."""
    from sere_scale.plan.estimate import Plan, evaluate
    from sere_scale.plan.hardware import GPU
    w = tuple(range(16))
    calls = [Collective("all_gather", 10**9, w), Collective("all_reduce", 12, w), Collective("all_gather", 10**9, w),
             Collective("reduce_scatter", 2 * 10**9, w), Collective("reduce_scatter", 2 * 10**9, w)]
    links = Links(gpus_per_node=8, intra_gbs=400, inter_gbs=50, latency_intra_s=1e-5, latency_inter_s=2e-5)
    gpu = GPU("made-up", 80 << 30, 100e12, 3000)
    ag, rs = 15 / 16 * 1e9 / 50e9 + 8e-5, 15 / 16 * 2e9 / 50e9 + 8e-5  # 0.01883 s, 0.03758 s
    vote = 2 * 15 / 16 * 12 / 50e9 + 8e-5
    fsdp = evaluate(Plan("fsdp", "full", 4, 1, False, 0, 0, calls, 5 * 10**12, "made up"), 16, gpu, links, 0.5,
                    curve=(16,))
    step = ag + vote + rs + max(0.1, ag + rs)  # 0.05649 + 0.1
    assert fsdp["per_step"]["compute_s"] == pytest.approx(0.1)
    assert fsdp["per_step"]["step_s"] == pytest.approx(step)
    assert fsdp["per_step"]["comm_s"] == pytest.approx(2 * ag + vote + 2 * rs)
    assert fsdp["images_per_s_per_gpu"] == pytest.approx(4 / step)
    assert fsdp["scaling_efficiency"] == pytest.approx(0.1 / step)  # 0.639
    # ZeRO-2: both all-gathers follow the optimizer step, nothing to hide them behind
    zero2 = evaluate(Plan("deepspeed", "zero2", 4, 1, False, 0, 0, calls, 5 * 10**12, "made up"), 16, gpu, links,
                     0.5, curve=(16,))
    assert zero2["per_step"]["step_s"] == pytest.approx(2 * ag + vote + rs + max(0.1, rs))
    # compute-bound no more: ten times the overlapped bytes exceed the compute
    big = [calls[0], Collective("all_gather", 10**10, w), calls[-1]]
    p = evaluate(Plan("fsdp", "full", 4, 1, False, 0, 0, big, 5 * 10**12, "made up"), 16, gpu, links, 0.5,
                 curve=(16,))
    assert p["per_step"]["step_s"] == pytest.approx(ag + rs + (15 / 16 * 1e10 / 50e9 + 8e-5))


def test_plan_command_writes_the_issue_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", *TINY, "data.path=unused", "--gpus", "16", "--backends", "ddp,deepspeed:3",
               "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["gpus"] == 16 and isinstance(res["recommended"], int)
    assert {(p["backend"], p["strategy"], p["checkpoint_activations"]) for p in res["plans"]} == {
        ("ddp", "replicate", False), ("ddp", "replicate", True), ("deepspeed", "zero3", False),
        ("deepspeed", "zero3", True)}
    for p in res["plans"]:
        assert set(p["per_rank"]) >= {"model_states_bytes", "activations_bytes", "peak_bytes"}
        assert set(p["per_step"]["comm_bytes"]) == {"all_gather", "reduce_scatter", "all_reduce", "broadcast"}
        assert set(p["per_step"]) >= {"compute_s", "comm_s", "step_s"}
        assert p["fits"] is True and 0 < p["scaling_efficiency"] <= 1 and p["images_per_s_per_gpu"] > 0
        assert p["per_rank"]["peak_bytes"] == p["per_rank"]["model_states_bytes"] + p["per_rank"]["activations_bytes"]
    ds = [p for p in res["plans"] if p["backend"] == "deepspeed"]
    assert all(p["source"].startswith("analytic") for p in ds)
    text = capsys.readouterr().out
    assert "torchrun --nnodes 2 --nproc-per-node 8" in text and "data.path=unused" in text


@pytest.mark.parametrize("args, message", [
    (["--gpu", "custom"], "--gpu custom needs"),
    (["--backends", "ddp,zero9"], "--backends: unknown zero9"),
    (["--calibrate", "/nonexistent/profile.json"], "--calibrate: cannot read"),
    (["--processes", "0"], "--processes must be at least 1"),
])
def test_bad_input_is_named(args, message, capsys):
    assert main(["plan", *TINY, "data.path=unused", "--gpus", "8", *args]) == 2
    assert message in capsys.readouterr().err


def test_calibration_scales_the_measured_step_by_flops():
    from sere_scale.plan.estimate import compute_seconds
    from sere_scale.plan.hardware import gpu_spec
    gpu = gpu_spec("h100")
    # 2e15 FLOPs at 40 % of 989e12 FLOP/s, by hand; measured 0.5 s for 1e15 FLOPs → 1.0 s for 2e15
    assert compute_seconds(2e15, gpu, 0.4) == pytest.approx(2e15 / (0.4 * 989e12))
    assert compute_seconds(2e15, gpu, 0.4, {"step_time_s": 0.5, "flops_per_step": 1e15}) == pytest.approx(1.0)
