"""End-to-end training on CPU: run directory, exact resume, corrupt images, non-finite losses."""
import shutil

import pytest
import torch
import yaml

from sere_scale.engine.checkpoint import find_latest
from sere_scale.method.sere_method import SEREMethod
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import NonFiniteLoss, train
from tests.tiny import tiny_config
from tests.conftest import digits_subset


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    """3 classes × 12 images of the digits set."""
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


def test_run_directory_contents(tmp_path, small_data):
    cfg = tiny_config(tmp_path / "run", small_data, "train.max_steps=3")
    out = train(cfg)
    assert out["step"] == 3
    run = tmp_path / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["data"]["path"] == str(small_data)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("step", "epoch", "loss", "loss_image", "loss_spatial", "loss_channel", "lr", "img_per_s",
                "teacher_entropy", "loss_image_norm", "feature_std", "mfu", "data_wait_pct"):
        assert key in rows[0], key
    for r in rows:  # the logged total is the weighted sum of the parts
        w = cfg.sere
        assert r["loss"] == pytest.approx(w.w_image * r["loss_image"] + w.alpha * r["loss_spatial"]
                                          + w.beta * r["loss_channel"], rel=1e-5)
    assert list((run / "tb").glob("events.*"))
    assert find_latest(run).name == "step_00000003"


def crashing(n_calls):
    """A method (injected with ``method_cls``) whose forward raises after ``n_calls`` calls: a crash mid-run."""
    class Crashing(SEREMethod):
        calls = 0

        def forward(self, *a, **k):
            Crashing.calls += 1
            if Crashing.calls > n_calls:
                raise KeyboardInterrupt("simulated crash")
            return super().forward(*a, **k)
    return Crashing


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_reproduces_the_uninterrupted_curve(tmp_path, small_data, accum):
    extra = ["train.max_steps=7", f"train.grad_accum={accum}", "data.batch_size=4"]
    ref = train(tiny_config(tmp_path / "ref", small_data, *extra))
    assert ref["step"] == 7
    run = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):  # dies during step 6; last checkpoint at step 3
        train(tiny_config(run, small_data, *extra), method_cls=crashing(5 * accum))
    assert find_latest(run).name == "step_00000003"
    assert read_metrics(run)[-1]["step"] == 5
    train(tiny_config(run, small_data, *extra), resume=True)
    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 8))
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_image", "loss_spatial", "loss_channel", "lr", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)


def test_corrupt_images_are_skipped_and_counted(tmp_path, small_data, caplog):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    first = sorted(data.iterdir())[0]
    (first / "zero.png").write_bytes(b"")
    good = sorted(first.glob("*.png"))[1].read_bytes()
    (first / "truncated.png").write_bytes(good[: len(good) // 2])
    (first / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    # 36 + 3 = 39 images, batch 13: one epoch of 3 steps covers every file
    cfg = tiny_config(tmp_path / "run", data, "data.batch_size=13", "train.max_steps=3", "train.log_every=3")
    with caplog.at_level("WARNING"):
        train(cfg)
    assert read_metrics(tmp_path / "run")[-1]["n_corrupt"] == 3
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 3


def nan_loss_at(call):
    """A method whose loss is NaN at the ``call``-th forward call (counted from 1)."""
    class NaNLoss(SEREMethod):
        calls = 0

        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            NaNLoss.calls += 1
            if NaNLoss.calls == call:
                out["loss"] = out["loss"] * float("nan")
            return out
    return NaNLoss


def test_nonfinite_loss_stops_with_a_good_checkpoint(tmp_path, small_data):
    cfg = tiny_config(tmp_path / "run", small_data, "train.max_steps=8")
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 5 .*after step 4"):
        train(cfg, method_cls=nan_loss_at(5))
    latest = find_latest(tmp_path / "run")
    assert latest.name == "step_00000004"
    sd = torch.load(latest / "model.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in sd["student"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in sd["method"].values())  # centers untouched by the NaN step


def test_nonfinite_loss_skip_policy_counts(tmp_path, small_data):
    cfg = tiny_config(tmp_path / "run", small_data, "train.max_steps=4", "train.nonfinite=skip")
    out = train(cfg, method_cls=nan_loss_at(2))
    assert out["step"] == 4
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the skipped step is logged like any other
    assert rows[1]["skipped"] is True and rows[1]["loss"] is None and "loss" in rows[1]["nonfinite"]
    assert not any(r.get("skipped") for r in rows[::2] + rows[3:])
    assert [r["n_skipped"] for r in rows] == [0, 1, 1, 1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if not r.get("skipped"))
    sd = torch.load(find_latest(tmp_path / "run") / "model.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in sd["student"].values() if v.is_floating_point())


def test_live_mfu_and_data_wait_are_plausible(tmp_path, small_data):
    train(tiny_config(tmp_path / "run", small_data, "train.max_steps=2"))
    rows = read_metrics(tmp_path / "run")
    assert all(0 < r["mfu"] < 1 and 0 <= r["data_wait_pct"] <= 100 for r in rows)


@pytest.mark.parametrize("crops", [("3", "0", "48", "16"), ("2", "3", "24", "8")])
def test_any_number_of_crops_and_sizes(tmp_path, small_data, crops):
    ng, nl, gs, ls = crops
    cfg = tiny_config(tmp_path / "run", small_data, f"data.n_global={ng}", f"data.n_local={nl}",
                      f"data.global_size={gs}", f"data.local_size={ls}", "train.max_steps=2",
                      "sere.spatial_size_local=1")
    out = train(cfg)
    rows = read_metrics(tmp_path / "run")
    assert out["step"] == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_training_from_webdataset_shards_with_exact_resume(tmp_path, digits_root):
    """sere-prep converts the digits folder; training streams the shards and resumes exactly."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "data_prep", "imagenet", str(digits_root), str(out), "--split", "train",
                        "--shard-size", "200", "--workers", "1", "--quiet"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    extra = ["data.path=", f"data.shards={out}", "train.max_steps=6", "data.batch_size=4"]
    ref = train(tiny_config(tmp_path / "ref", "", *extra))
    assert ref["step"] == 6
    run = tmp_path / "crash"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, "", *extra), method_cls=crashing(4))
    train(tiny_config(run, "", *extra), resume=True)
    a, b = read_metrics(tmp_path / "ref"), read_metrics(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6), ra["step"]


def nan_input_at(calls_nan):
    """A method that gets NaN crops at the forward calls in ``calls_nan`` (call numbers, counted from 1): the
    forward itself goes non-finite, BatchNorm running statistics included."""
    class NaNInput(SEREMethod):
        calls = 0

        def forward(self, student, teacher, batch, s):
            NaNInput.calls += 1
            if NaNInput.calls in calls_nan:
                batch = {**batch, "crops": [c * float("nan") for c in batch["crops"]]}
            return super().forward(student, teacher, batch, s)
    return NaNInput


def _tensors(sd, prefix=""):
    """Every tensor of a nested checkpoint dict, by path."""
    if isinstance(sd, torch.Tensor):
        yield prefix, sd
    elif isinstance(sd, dict):
        for k, v in sd.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(sd, (list, tuple)):
        for i, v in enumerate(sd):
            yield from _tensors(v, f"{prefix}/{i}")


@pytest.mark.parametrize("fail_call, periodic", [(5, True), (4, False)])
def test_nonfinite_stop_checkpoints_the_state_before_the_step(tmp_path, small_data, fail_call, periodic):
    """checkpoint.every_steps=2. NaN crops in step 5 (after the periodic checkpoint of step 4: it must be kept as
    written) or in step 4 (the state after step 3 is saved). Either way the checkpoint holds exactly the state of an
    uninterrupted run stopped before that step: every tensor finite, BatchNorm running stats included."""
    good_steps = fail_call - 1
    ref = tmp_path / "ref"
    train(tiny_config(ref, small_data, f"train.max_steps={good_steps}", "checkpoint.every_steps=2"))
    ref_sd = torch.load(ref / "checkpoints" / f"step_{good_steps:08d}" / "model.pt", weights_only=False)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match=f"non-finite loss at step {fail_call} .*after step {good_steps}"):
        train(tiny_config(run, small_data, "train.max_steps=8", "checkpoint.every_steps=2"),
              method_cls=nan_input_at({fail_call}))
    latest = find_latest(run)
    assert latest.name == f"step_{good_steps:08d}"
    sd = torch.load(latest / "model.pt", weights_only=False)
    got, want = dict(_tensors(sd)), dict(_tensors(ref_sd))
    assert got.keys() == want.keys()
    bn = [k for k in got if "running_" in k]
    assert bn, "the relation heads' BatchNorm statistics are in the checkpoint"
    for k, v in got.items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k
        assert torch.equal(v, want[k]), k
    assert sd["train_state"] == ref_sd["train_state"] and sd["train_state"]["step"] == good_steps
    # the run resumes from it and trains on
    out = train(tiny_config(run, small_data, f"train.max_steps={good_steps + 1}", "checkpoint.every_steps=2"),
                resume=True)
    assert out["step"] == good_steps + 1


def test_nonfinite_skip_on_the_last_step_still_logs_and_checkpoints(tmp_path, small_data):
    train(tiny_config(tmp_path / "run", small_data, "train.max_steps=4", "train.nonfinite=skip"),
          method_cls=nan_input_at({4}))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["skipped"] and rows[-1]["n_skipped"] == 1
    latest = find_latest(tmp_path / "run")
    assert latest.name == "step_00000004"
    sd = torch.load(latest / "model.pt", weights_only=False)
    assert sd["train_state"]["step"] == 4 and sd["train_state"]["n_skipped"] == 1
    for k, v in _tensors(sd):
        assert not v.is_floating_point() or torch.isfinite(v).all(), k


def test_consecutive_skips_stop_the_run_with_exit_3(tmp_path, small_data):
    from sere_scale.run.train import EXIT_NONFINITE, main_train
    cfg = tiny_config(tmp_path / "run", small_data, "train.max_steps=20", "train.nonfinite=skip",
                      "train.max_consecutive_skips=4")
    diverged = nan_input_at(set(range(3, 100)))  # diverged from step 3 on
    assert main_train(cfg, resume=False, method_cls=diverged) == EXIT_NONFINITE == 3
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped", False) for r in rows] == [False] * 2 + [True] * 4
    sd = torch.load(find_latest(tmp_path / "run") / "model.pt", weights_only=False)  # step 6 (every 3 steps)
    for k, v in _tensors(sd):
        assert not v.is_floating_point() or torch.isfinite(v).all(), k


def test_metrics_are_strict_json(tmp_path, small_data):
    import json

    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    train(tiny_config(tmp_path / "run", small_data, "train.max_steps=3", "train.nonfinite=skip"),
          method_cls=nan_loss_at(2))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(ln, parse_constant=refuse) for ln in lines]  # every line, the start record included
    assert recs[0].get("event") == "start"
    recs = [r for r in recs if "event" not in r]
    assert recs[1]["loss"] is None and set(recs[1]["nonfinite"]) >= {"loss"}
    assert all(recs[1][k] is None for k in recs[1]["nonfinite"])
    assert "nonfinite" not in recs[0] and isinstance(recs[0]["loss"], float)
