"""The demo does not collapse (issue 27): ``configs/demo.yaml`` trained as ``make demo`` trains it (2 ranks on
gloo, the embedded pretraining scenes, every step of the run) with ``train.on_collapse=stop``, and its logged
health figures checked against the collapse definitions written out here: the teacher's mean per-image entropy
strictly between 0.02·ln K and 0.98·ln K, the student's CLS spread ``feature_std`` above 0.05, at every logged
step after the first epoch (the alarm's own window is 5 logged steps; this is stricter)."""
import json
import math
import subprocess
import sys

import pytest

from sere_scale.config.load import load_config
from sere_scale.data.demo_data import write_pretrain_scenes
from tests.conftest import ROOT, subprocess_env
from tests.procs import kill_tree

pytestmark = pytest.mark.slow


def test_demo_config_stays_out_of_collapse_for_its_whole_run(tmp_path):
    data = write_pretrain_scenes(tmp_path / "pretrain")
    run = tmp_path / "run"
    over = [f"data.path={data}", f"output_dir={run}", "train.on_collapse=stop"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sere_scale",
           "train", "--config", str(ROOT / "configs" / "demo.yaml"), *over]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = proc.communicate(timeout=1200)[0]
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail("the demo training did not finish in 1200 s")
    assert proc.returncode == 0, out[-4000:]  # exit code 4 if the alarm had stopped it
    cfg = load_config(ROOT / "configs" / "demo.yaml", over)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert not [r for r in recs if r.get("event") == "collapse"]
    steps = [r for r in recs if "loss" in r]
    per_epoch = -(-len(list(data.glob("scenes/*.png"))) // (2 * cfg.data.batch_size))
    assert steps and steps[-1]["step"] == cfg.train.epochs * per_epoch  # the whole run
    ln_k = math.log(cfg.image_loss.out_dim)
    judged = [r for r in steps if r["step"] > per_epoch]
    assert len(judged) >= 10
    for r in judged:
        assert r["feature_std"] > 0.05, r
        if cfg.image_loss.kind in ("dino", "ibot"):
            assert 0.02 * ln_k < r["teacher_entropy"] < 0.98 * ln_k, r


def test_health_report_prints_the_figures_the_image_loss_logs(tmp_path, capsys):
    """``make demo``'s last lines: the last logged step's figures (teacher entropy as a fraction of ln K for
    DINO/iBOT, MoCo v3's accuracy otherwise) and each collapse event."""
    from sere_scale.commands.demo import health_report
    for kind, rec, want, event in (
            ("ibot", {"teacher_entropy": 0.5 * math.log(64), "loss_image_norm": 0.9, "feature_std": 0.7},
             "teacher_entropy / ln K 0.500, loss_image_norm 0.900, feature_std 0.700", None),
            ("mocov3", {"loss_image_norm": 0.8, "moco_acc": 0.25, "feature_std": 0.02},
             "loss_image_norm 0.800, moco_acc 0.250, feature_std 0.020",
             {"event": "collapse", "kind": "features", "window_start": 5, "figure": "feature_std", "value": 0.02})):
        run = tmp_path / kind
        run.mkdir()
        rows = [{"step": 5, "loss": 1.0, **rec}, {"step": 10, "loss": 1.0, **rec}] + ([event] if event else [])
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        health_report(load_config(None, [f"output_dir={run}", f"image_loss.kind={kind}", "image_loss.out_dim=64"]))
        out = capsys.readouterr().out
        assert f"Training health at step 10: {want}" in out
        assert ("no collapse alarm" in out) == (event is None)
        assert ("collapse alarm: features from step 5 (feature_std 0.020)" in out) == (event is not None)
