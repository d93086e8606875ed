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
    over, block, by_type = comm_time([Collective("all_reduce", 10**9, world16)], 16, 16, links)
    assert over == pytest.approx(2 * 15 / 16 * 10**9 / 50e9 + 4 * 2e-5) and block == 0
    # a 1 KiB all-gather inside one node of 8: (7/8)·1024 / 400e9 + 1e-5 · 3, on the critical path
    over, block, _ = comm_time([Collective("all_gather", 1024, tuple(range(8)))], 16, 16, links)
    assert over == 0 and block == pytest.approx(7 / 8 * 1024 / 400e9 + 3e-5)
    # at 512 ranks the world group is the world; HSDP's node group stays 8; its replica group grows to 64
    assert scaled_group(Collective("all_reduce", 1, world16), 16, 512, 8) == (512, True)
    assert scaled_group(Collective("all_gather", 1, tuple(range(8, 16))), 16, 512, 8) == (8, False)
    assert scaled_group(Collective("all_reduce", 1, (3, 11)), 16, 512, 8) == (64, True)


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
