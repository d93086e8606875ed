"""The start-up banner (rank 0, log + first metrics.jsonl record) under a single process, torchrun and
accelerate (the documented form, and ``--cpu --num_processes 2``, which starts ONE process); the wall-clock
``time`` of metrics records; no deprecation warning from our code on any rank."""
import re
import subprocess
import sys
import time

import pytest

from sere_scale.run.metrics import read_metrics
from tests.conftest import ROOT, digits_subset, subprocess_env
from tests.fake_tracker import calls
from tests.tiny import tiny_overrides

HOOK = "log.hooks=[tests.fake_tracker:recorder]"


@pytest.fixture(scope="module")
def data16(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data16"), 2, 8)  # 16 images


def _train(launch: list, run, data, *extra, timeout=400):
    cmd = [sys.executable, *launch, "-m", "sere_scale", "train",
           *tiny_overrides(run, data, "train.max_steps=2", "data.batch_size=4", "checkpoint.every_steps=2", *extra)]
    t0 = time.time()
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return res.stdout + res.stderr, t0, time.time()


def _check(run, out, world, launcher, t0, t1, data):
    assert out.count("sere_scale training run") == 1, out[-3000:]  # rank 0 only
    assert re.search(rf"world size\s+{world} \({world} ranks/node, 1 node\(s\)\); launcher {re.escape(launcher)}",
                     out), out[-3000:]
    assert f"output_dir    {run.resolve()}" in out and f"({16} images)" in out
    assert not re.search(r"(Future|Deprecation)Warning", out), out[-3000:]
    first = read_metrics(run, events=True)[0]
    assert first["event"] == "start"
    assert first["world_size"] == world and first["ranks_per_node"] == world and first["launcher"] == launcher
    assert first["global_batch"] == 4 * world and first["steps"] == 2 and first["data_images"] == 16
    assert first["engine"] == "ddp" and first["precision"] == "fp32" and first["devices"] == f"{world} × cpu"
    assert first["output_dir"] == str(run.resolve()) and first["data"] == str(data) and first["resume"] is None
    steps = read_metrics(run)
    assert [r["step"] for r in steps] == [1, 2]
    times = [first["time"]] + [r["time"] for r in steps]
    assert t0 <= times[0] <= times[1] <= times[2] <= t1  # Unix seconds, in order


def test_banner_single_process_and_resume_point(tmp_path, data16):
    run = tmp_path / "single"
    out, t0, t1 = _train([], run, data16)
    _check(run, out, 1, "none (single process)", t0, t1, data16)
    out, _, _ = _train([], run, data16, "train.max_steps=3", "--resume")
    assert re.search(r"resume\s+step 2 from .*step_00000002", out), out[-3000:]
    starts = [r for r in read_metrics(run, events=True) if r.get("event") == "start"]
    assert len(starts) == 2 and starts[1]["resume"]["step"] == 2 and starts[1]["step"] == 2


def test_banner_torchrun_rank0_only_and_trackers_on_rank0_only(tmp_path, data16):
    run = tmp_path / "torchrun"
    out, t0, t1 = _train(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], run, data16, HOOK)
    _check(run, out, 2, "torchrun", t0, t1, data16)
    got = calls(run, 0)
    assert [c["call"] for c in got] == ["start", "log", "log", "finish"] and calls(run, 1) == []
    assert got[0]["banner"]["world_size"] == 2 and got[0]["config"]["log"]["hooks"] == ["tests.fake_tracker:recorder"]
    assert got[-1]["exit"] == "done"


def test_banner_accelerate_documented_form(tmp_path, data16):
    run = tmp_path / "accelerate"
    launch = ["-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "single_node.yaml"), "--num_processes", "2"]
    out, t0, t1 = _train(launch, run, data16)
    _check(run, out, 2, "accelerate (torchrun)", t0, t1, data16)


def test_accelerate_cpu_two_processes_asked_shows_world_size_1(tmp_path, data16):
    """``accelerate launch --cpu --num_processes 2`` starts one process: the banner says so, and warns."""
    run = tmp_path / "accelerate_cpu"
    out, t0, t1 = _train(["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"], run, data16)
    _check(run, out, 1, "accelerate", t0, t1, data16)
    assert "accelerate launch --cpu started a single process" in out
