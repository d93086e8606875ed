"""One training run = one tracker run: a W&B offline run and an MLflow run (file store allowed) cut twice and
resumed keep one run id each, with a curve equal to ``metrics.jsonl``; ``--move-old`` starts new ones; a tracker
that cannot start stops the run (exit 2) before ``output_dir`` exists, unless ``log.tracker_errors=warn``."""
import glob
import json
import subprocess
import sys

import pytest

from sere_scale.config.load import ConfigError
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import train
from tests.conftest import digits_subset, subprocess_env
from tests.fake_tracker import calls
from tests.tiny import tiny_config, tiny_overrides
from tests.wandb_records import history, run_id


@pytest.fixture(scope="module")
def data16(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data16"), 2, 8)


def _cut(cfg_args, exit_at, monkeypatch, resume):
    """One run segment that ends as a killed process would, in the middle of logging step ``exit_at`` (the
    hook, called after W&B and MLflow, raises SystemExit there; the last checkpoint is older)."""
    monkeypatch.setenv("SERE_FAKE_TRACKER_EXIT_AT", str(exit_at))
    with pytest.raises(SystemExit):
        train(tiny_config(*cfg_args), resume=resume)


def test_wandb_and_mlflow_runs_survive_two_resumes_with_the_curve_of_metrics_jsonl(tmp_path, data16, monkeypatch):
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "run"
    args = (run, data16, "train.max_steps=6", "data.batch_size=4", "checkpoint.every_steps=2",
            "log.wandb.enabled=true", "log.wandb.mode=offline", "log.wandb.project=sere_test",
            "log.mlflow.enabled=true", f"log.mlflow.tracking_uri={uri}", "log.mlflow.experiment=cont",
            "log.hooks=[tests.fake_tracker:recorder]")
    _cut(args, 3, monkeypatch, resume=False)  # trackers hold steps 1-3, the checkpoint is step 2
    ids = json.loads((run / "trackers.json").read_text())
    assert ids["wandb"]["last_step"] == 3 and ids["mlflow"]["last_step"] == 3
    _cut(args, 5, monkeypatch, resume=True)  # from step 2: step 3 again (not sent), 4, 5; checkpoint 4
    monkeypatch.delenv("SERE_FAKE_TRACKER_EXIT_AT")
    res = train(tiny_config(*args), resume=True)  # from step 4: step 5 again (not sent), 6
    assert res["exit"] == "done" and res["step"] == 6
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "trackers.json").read_text())["wandb"]["id"] == ids["wandb"]["id"]

    # W&B: three offline segments of one run id; together each step once, with metrics.jsonl's values
    files = sorted(glob.glob(str(run / "wandb" / "offline-run-*" / "*.wandb")))
    assert len(files) == 3 and {run_id(f) for f in files} == {ids["wandb"]["id"]}
    logged = [h for f in files for h in history(f) if "train/loss" in h]
    assert [h["_step"] for h in logged] == [1, 2, 3, 4, 5, 6]
    for h, r in zip(logged, rows):
        assert h["train/loss"] == pytest.approx(r["loss"], rel=1e-6, abs=1e-7)  # step 3, 5: logged before the
        assert h["train/lr"] == pytest.approx(r["lr"], rel=1e-9)                  # resume; the rerun is exact

    # MLflow: one run in the experiment, reopened twice; each step once, with metrics.jsonl's values
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("cont")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    hist = sorted(client.get_metric_history(ids["mlflow"]["run_id"], "train/loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == [1, 2, 3, 4, 5, 6]
    for m, r in zip(hist, rows):
        assert m.value == pytest.approx(r["loss"], rel=1e-6, abs=1e-7)
    assert runs[0].data.params["data.batch_size"] == "4" and runs[0].info.status == "FINISHED"
    assert {c["call"] for c in calls(run)} == {"start", "log", "finish"}

    # a fresh run into the folder (--move-old) is a new tracker run; the old folder keeps its memory
    train(tiny_config(*args[:2], "train.max_steps=1", *args[3:]), move_old=True)
    new = json.loads((run / "trackers.json").read_text())
    assert new["wandb"]["id"] != ids["wandb"]["id"] and new["mlflow"]["run_id"] != ids["mlflow"]["run_id"]
    assert json.loads((tmp_path / "run.old-1" / "trackers.json").read_text())["wandb"]["id"] == ids["wandb"]["id"]
    assert len(client.search_runs([exp.experiment_id])) == 2


def test_a_tracker_that_cannot_start_exits_2_before_output_dir_is_written(tmp_path, data16):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    store = tmp_path / "mlruns"
    env = subprocess_env()
    env.pop("MLFLOW_ALLOW_FILE_STORE", None)  # MLflow 3 refuses a file store without it
    cmd = [sys.executable, "-m", "sere_scale", "train",
           *tiny_overrides(run, data16, "train.max_steps=1", "data.batch_size=4", "log.mlflow.enabled=true",
                           f"log.mlflow.tracking_uri={store.as_uri()}")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "log.mlflow.tracking_uri" in res.stderr and "maintenance mode" in res.stderr
    assert "log.tracker_errors=warn" in res.stderr
    assert not run.exists()
    res = subprocess.run([*cmd, "log.tracker_errors=warn"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training without it" in res.stderr and len(read_metrics(run)) == 1
    assert not (run / "trackers.json").exists()


def test_a_hook_that_cannot_be_imported_is_a_config_error_naming_it(tmp_path, data16):
    with pytest.raises(ConfigError, match=r"log.hooks\[1\].*no_such_module_xyz"):
        train(tiny_config(tmp_path / "run", data16, "log.hooks=[tests.fake_tracker:recorder, no_such_module_xyz:f]"))
    assert not (tmp_path / "run").exists()
