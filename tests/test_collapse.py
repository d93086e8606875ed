"""The collapse alarm (``train.on_collapse``): the detector on hand-written sequences of logged figures, the
config keys, and forced collapses of the tiny model (uniform: teacher temperature 100; one-hot: teacher
temperature 1e-4 without centering) with warn and with stop."""
import json
import math

import pytest
import torch

from sere_scale.config.load import ConfigError, load_config
from sere_scale.engine.checkpoint import find_latest, read_meta
from sere_scale.run.collapse import CollapseDetector, rules
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import EXIT_COLLAPSE, main_train, train
from tests.conftest import digits_subset
from tests.fake_tracker import calls
from tests.tiny import tiny_config

LN64 = math.log(64)  # the tiny config's image_loss.out_dim = 64


def detector(*extra, window=3):
    cfg = load_config(None, ["image_loss.out_dim=64", f"train.collapse_window={window}", *extra])
    return CollapseDetector(rules(cfg), window)


def feed(det, figure, values, log_every=10):
    """Logged records every ``log_every`` steps; returns [(kind, step, window_start, values)] of the firings."""
    out = []
    for i, v in enumerate(values):
        rec = v if isinstance(v, dict) else {figure: v}
        out += [(f.rule.kind, f.step, f.start, [x for _, x in f.window]) for f in det.update((i + 1) * log_every, rec)]
    return out


def test_thresholds_are_fractions_of_ln_k_and_the_feature_std():
    got = {r.kind: (r.figure, r.threshold, r.above) for r in detector().rules}
    assert got == {"uniform": ("teacher_entropy", pytest.approx(0.98 * LN64), True),
                   "one_hot": ("teacher_entropy", pytest.approx(0.02 * LN64), False),
                   "features": ("feature_std", 0.05, False)}


def test_uniform_fires_once_when_the_whole_window_is_at_ln_k():
    # 0.98 ln 64 = 4.0757: 4.08, 4.15 and 4.159 are beyond it, 4.07 is not
    seq = [1.3, 1.5, 4.07, 4.08, 4.15, 4.159, 4.159, 4.159]
    assert feed(detector(), "teacher_entropy", seq) == [("uniform", 60, 40, [4.08, 4.15, 4.159])]


def test_one_hot_fires_on_a_near_zero_entropy():
    # 0.02 ln 64 = 0.0832
    assert feed(detector(), "teacher_entropy", [0.5, 0.083, 0.01, 0.0]) == [("one_hot", 40, 20, [0.083, 0.01, 0.0])]
    assert feed(detector(), "teacher_entropy", [0.5, 0.084, 0.01, 0.0]) == []  # 0.084 > 0.0832: not yet full


def test_low_feature_std_fires_and_the_threshold_is_a_key():
    assert feed(detector(), "feature_std", [0.9, 0.05, 0.02, 0.01]) == [("features", 40, 20, [0.05, 0.02, 0.01])]
    assert feed(detector("train.collapse_feature_std=0.01"), "feature_std", [0.9, 0.05, 0.02, 0.01]) == []


def test_a_healthy_run_and_a_window_not_yet_full_stay_silent():
    healthy = [{"teacher_entropy": 1.3 + 0.1 * i, "feature_std": 0.4} for i in range(20)]
    assert feed(detector(), "", healthy) == []
    assert feed(detector(window=5), "teacher_entropy", [4.159] * 4) == []
    # a healthy step inside breaks the run: 2 + 2 beyond is not a window of 3
    assert feed(detector(), "teacher_entropy", [4.159, 4.159, 1.0, 4.159, 4.159]) == []
    assert feed(detector(), "teacher_entropy", [4.159, float("nan"), 4.159, 4.159]) == []  # NaN is not beyond


def test_each_kind_fires_once_and_kinds_are_independent():
    seq = [{"teacher_entropy": 4.159, "feature_std": 0.5}] * 5 + [{"teacher_entropy": 4.159, "feature_std": 0.0}] * 6
    got = feed(detector(), "", seq)
    assert [(k, s, w0) for k, s, w0, _ in got] == [("uniform", 30, 10), ("features", 80, 60)]


def test_steps_skipped_on_a_nonfinite_loss_are_ignored():
    seq = [4.159, {"teacher_entropy": float("nan"), "skipped": True}, 4.159, 4.159]
    assert feed(detector(), "teacher_entropy", seq) == [("uniform", 40, 10, [4.159, 4.159, 4.159])]


def test_the_window_tracks_where_a_collapse_is_forming():
    det = detector(window=4)
    assert det.forming_since() is None
    feed(det, "teacher_entropy", [1.0, 4.159, 4.159])
    assert det.forming_since() == 20
    det.update(40, {"teacher_entropy": 1.0})
    assert det.forming_since() is None


def test_mocov3_and_no_image_loss_judge_the_features_only():
    for kind in ("mocov3", "none"):
        cfg = load_config(None, [f"image_loss.kind={kind}"])
        assert [r.kind for r in rules(cfg)] == ["features"]


class Events:
    def __init__(self):
        self.got = []

    def event(self, record, scalars):
        self.got.append((record["kind"], record["step"], scalars))


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_the_alarm_reports_each_kind_once_and_ignore_silences_it(tmp_path, policy):
    from sere_scale.engine.checkpoint import CheckpointManager
    from sere_scale.engine.distributed import DistInfo
    from sere_scale.run.collapse import CollapseAlarm
    cfg = load_config(None, ["image_loss.out_dim=64", "train.collapse_window=2", f"train.on_collapse={policy}"])
    events = Events()
    alarm = CollapseAlarm(cfg, DistInfo(), events, CheckpointManager(tmp_path))
    for step in (10, 20, 30, 40):
        alarm.after_log(step, {"teacher_entropy": LN64, "feature_std": 0.5})
    want = [("uniform", 20, {"collapse": 1, "collapse_uniform": 1})] if policy == "warn" else []
    assert events.got == want


@pytest.mark.parametrize("key, value", [("train.on_collapse", "maybe"), ("train.collapse_window", 0),
                                        ("train.collapse_uniform", 1.5), ("train.collapse_uniform", 0),
                                        ("train.collapse_one_hot", 0.99), ("train.collapse_feature_std", -1)])
def test_bad_thresholds_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


# ---------------------------------------------------------------- forced collapses of the tiny model
@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    """3 classes × 12 images: 4 steps per epoch at batch 8."""
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


# epoch 0 at the warm-up teacher temperature 0.04 (healthy), from step 5 on (epoch 1) at 100: uniform
UNIFORM_FROM_STEP_5 = ["train.epochs=3", "image_loss.warmup_teacher_temp_epochs=2", "image_loss.teacher_temp=100",
                       "train.collapse_window=3"]


def collapse_events(run):
    return [r for r in read_metrics(run, events=True) if r.get("event") == "collapse"]


def test_forced_uniform_collapse_warns_once_logs_the_event_and_trains_on(tmp_path, small_data, caplog):
    run = tmp_path / "run"
    cfg = tiny_config(run, small_data, *UNIFORM_FROM_STEP_5, "train.max_steps=9",
                      "log.hooks=[tests.fake_tracker:recorder]")
    with caplog.at_level("WARNING", logger="sere_scale"):
        out = train(cfg)
    assert out["step"] == 9
    rows = {r["step"]: r for r in read_metrics(run)}
    assert all(rows[s]["teacher_entropy"] < 0.98 * LN64 for s in (1, 2, 3, 4))  # healthy at temperature 0.04
    assert all(rows[s]["teacher_entropy"] >= 0.98 * LN64 for s in range(5, 10))
    (ev,) = collapse_events(run)
    assert (ev["kind"], ev["step"], ev["window_start"], ev["figure"], ev["action"]) == (
        "uniform", 7, 5, "teacher_entropy", "warn")
    assert ev["threshold"] == pytest.approx(0.98 * LN64) and ev["window"] == [rows[s]["teacher_entropy"]
                                                                             for s in (5, 6, 7)]
    warned = [r.getMessage() for r in caplog.records if "COLLAPSE" in r.getMessage()]
    assert len(warned) == 1 and "teacher_entropy" in warned[0] and "teacher_temp" in warned[0]
    tracked = [c for c in calls(run) if c["call"] == "log" and "train/collapse" in c["values"]]  # TB's names
    assert [(c["step"], c["values"]) for c in tracked] == [(7, {"train/collapse": 1, "train/collapse_uniform": 1})]
    assert find_latest(run).name == "step_00000009"  # warn changes no checkpoint


def test_forced_one_hot_collapse_warns(tmp_path, small_data):
    run = tmp_path / "run"
    train(tiny_config(run, small_data, "train.max_steps=4", "train.collapse_window=3",
                      "image_loss.warmup_teacher_temp=1e-4", "image_loss.teacher_temp=1e-4",
                      "image_loss.center_momentum=1.0"))
    assert all(r["teacher_entropy"] <= 0.02 * LN64 for r in read_metrics(run))
    assert [(e["kind"], e["step"], e["window_start"]) for e in collapse_events(run)] == [("one_hot", 3, 1)]


def test_stop_exits_4_and_resumes_from_the_checkpoint_before_the_window(tmp_path, small_data):
    """Checkpoints every step, keep 1. The window is steps 5-7: step 4's checkpoint is held from pruning while it
    forms (keep=1 would remove it at step 5), step 6's is set aside, nothing is saved at step 7, and ``latest``
    names step 4, where ``--resume`` continues."""
    run = tmp_path / "run"
    common = ["checkpoint.every_steps=1", "checkpoint.keep=1"]
    cfg = tiny_config(run, small_data, *UNIFORM_FROM_STEP_5, *common, "train.max_steps=12", "train.on_collapse=stop")
    assert main_train(cfg, resume=False) == EXIT_COLLAPSE == 4
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 8))
    assert [(e["kind"], e["step"], e["action"]) for e in collapse_events(run)] == [("uniform", 7, "stop")]
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000004"
    assert find_latest(run) == ck / "step_00000004" and read_meta(ck / "step_00000004")["step"] == 4
    names = sorted(p.name for p in ck.iterdir() if p.is_dir())
    assert names == ["step_00000004", "step_00000006.collapsed"]  # 5 pruned (keep=1), no 7
    sd = torch.load(ck / "step_00000004" / "model.pt", weights_only=False)
    assert sd["train_state"]["step"] == 4
    out = train(tiny_config(run, small_data, *UNIFORM_FROM_STEP_5, *common, "train.max_steps=5",
                            "train.on_collapse=ignore"), resume=True)
    assert out["step"] == 5 and [r["step"] for r in read_metrics(run)] == list(range(1, 6))


def test_stop_before_any_checkpoint_leaves_no_resume_point(tmp_path, small_data):
    run = tmp_path / "run"
    cfg = tiny_config(run, small_data, "train.max_steps=6", "train.collapse_window=2", "train.on_collapse=stop",
                      "checkpoint.every_steps=1", "image_loss.warmup_teacher_temp=100", "image_loss.teacher_temp=100")
    assert main_train(cfg, resume=False) == EXIT_COLLAPSE
    ck = run / "checkpoints"
    assert find_latest(run) is None and not (ck / "latest").exists()
    assert sorted(p.name for p in ck.iterdir()) == ["step_00000001.collapsed"]
    ev = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert (ev["event"], ev["kind"], ev["step"], ev["window_start"]) == ("collapse", "uniform", 2, 1)


@pytest.mark.slow
def test_stop_is_taken_by_every_rank_together(tmp_path, small_data):
    """2 ranks (torchrun, gloo): 2 steps per epoch, uniform from step 3 (epoch 1), window 2: both ranks exit 4 at
    step 4, ``latest`` names step 2 (held from pruning), step 3's checkpoint is set aside."""
    import subprocess
    import sys

    from tests.conftest import ROOT, subprocess_env
    from tests.tiny import tiny_overrides
    run, rc_log = tmp_path / "run", tmp_path / "rc.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / "cli_rc.py"), "train",
           *tiny_overrides(run, small_data, "train.epochs=4", "image_loss.warmup_teacher_temp_epochs=2",
                           "image_loss.teacher_temp=100", "train.collapse_window=2", "train.on_collapse=stop",
                           "checkpoint.every_steps=1", "checkpoint.keep=1", "train.hang_timeout_s=120")]
    res = subprocess.run(cmd, env=subprocess_env(RC_LOG=str(rc_log)), capture_output=True, text=True, timeout=300)
    assert sorted(rc_log.read_text().split()) == ["0", "1", "4", "4"], res.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert [(e["kind"], e["step"], e["window_start"]) for e in collapse_events(run)] == [("uniform", 4, 3)]
    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step_00000002"
    assert sorted(p.name for p in ck.iterdir() if p.is_dir()) == ["step_00000002", "step_00000003.collapsed"]
