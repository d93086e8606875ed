"""A 2-rank DDP run on CPU (gloo, torchrun)."""
import json
import subprocess
import sys

from sere_scale.run.metrics import read_metrics
from tests.conftest import ROOT, subprocess_env
from tests.tiny import tiny_overrides


def test_two_rank_ddp_training_keeps_ranks_in_sync(tmp_path, digits_root):
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "ddp_run.py"), str(report),
           *tiny_overrides(tmp_path / "run", digits_root / "train", "train.max_steps=4")]
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["world"] == 2 and rep["step"] == 4
    assert rep["max_diff"]["student"] == 0.0 and rep["max_diff"]["teacher"] == 0.0
    assert rep["max_diff"]["center"] == 0.0
    assert rep["max_diff"]["moved"] > 0  # the student trained away from its EMA teacher
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # lr follows the linear scaling rule on the global batch (2 ranks × 8) during warmup (one epoch of
    # steps_per_epoch steps, reaching the base rate at its last step)
    steps_per_epoch = 1437 // 16
    assert abs(rows[0]["lr"] - 1e-3 * 16 / 256 * 0 / (steps_per_epoch - 1)) < 1e-12
    assert abs(rows[1]["lr"] - 1e-3 * 16 / 256 * 1 / (steps_per_epoch - 1)) < 1e-9
