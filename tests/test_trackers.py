"""Experiment trackers: W&B (a fake module recording calls, and the real package offline), the generic hook
(config once, scalars per log step, finish on exit and on preemption), TensorBoard config text + hparams."""
import glob
import json
import subprocess
import sys
import types

import pytest

from sere_scale.config.load import ConfigError
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import train
from tests.conftest import digits_subset, subprocess_env
from tests.fake_tracker import calls
from tests.tiny import tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def data16(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data16"), 2, 8)


class FakeRun:
    def __init__(self, log):
        self.calls, self.summary = log, {}

    def log(self, values, step=None):
        self.calls.append(("log", dict(values), step))

    def finish(self, exit_code=0):
        self.calls.append(("finish", exit_code, dict(self.summary)))


def fake_wandb(monkeypatch):
    rec = []
    mod = types.ModuleType("wandb")

    def init(**kw):
        rec.append(("init", kw))
        return FakeRun(rec)
    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    return rec


def test_wandb_gets_config_once_scalars_per_log_step_and_finish(tmp_path, data16, monkeypatch):
    rec = fake_wandb(monkeypatch)
    cfg = tiny_config(tmp_path / "run", data16, "train.max_steps=3", "data.batch_size=4", "log.wandb.enabled=true",
                      "log.wandb.project=proj", "log.wandb.entity=team", "log.wandb.name=first",
                      "log.wandb.mode=offline", "log.wandb.tags=[a, b]")
    train(cfg)
    init = [c for c in rec if c[0] == "init"]
    assert len(init) == 1
    kw = init[0][1]
    assert (kw["project"], kw["entity"], kw["name"], kw["mode"], kw["tags"]) == ("proj", "team", "first", "offline",
                                                                                   ["a", "b"])
    assert kw["config"] == cfg.to_dict() and kw["dir"] == cfg.output_dir
    assert kw["resume"] == "allow" and json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"] == {
        "id": kw["id"], "last_step": 3}  # the run folder remembers the W&B run (tests/test_tracker_continuity.py)
    logs = [c for c in rec if c[0] == "log"]
    rows = read_metrics(cfg.output_dir)
    assert [s for _, _, s in logs] == [r["step"] for r in rows] == [1, 2, 3]
    for (_, values, _), r in zip(logs, rows):
        assert values["train/loss"] == r["loss"] and values["train/lr"] == r["lr"]
        assert "train/time" not in values and "train/step" not in values
    assert rec[-1][0] == "finish" and rec[-1][1] == 0 and rec[-1][2]["exit"] == "done"
    assert rec[-1][2]["start"]["world_size"] == 1
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins, as in wandb
    rec.clear()
    train(tiny_config(tmp_path / "run2", data16, "train.max_steps=1", "data.batch_size=4", "log.wandb.enabled=true"))
    assert rec[0][1]["mode"] == "disabled" and rec[0][1]["name"] == "run2" and rec[0][1]["entity"] is None


def test_a_missing_tracker_package_is_a_config_error_before_anything_is_written(tmp_path, data16, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails, as when not installed
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"log.mlflow.enabled.*sere_scale\[mlflow\]"):
        train(tiny_config(tmp_path / "run", data16, "log.mlflow.enabled=true"))
    assert not (tmp_path / "run").exists()


def test_hook_finishes_on_preemption(tmp_path, data16, monkeypatch):
    """SIGTERM arrives while step 2 is logged: the loop finishes step 3, checkpoints, exits 'preempted';
    the tracker saw the config once, steps 1-3, then finish('preempted')."""
    monkeypatch.setenv("SERE_FAKE_TRACKER_SIGTERM_AT", "2")
    cfg = tiny_config(tmp_path / "run", data16, "train.max_steps=6", "data.batch_size=4",
                      "log.hooks=[tests.fake_tracker:recorder]")
    res = train(cfg)
    assert res["exit"] == "preempted" and res["step"] == 3
    got = calls(cfg.output_dir)
    assert [c["call"] for c in got] == ["start", "log", "log", "log", "finish"]
    assert got[0]["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert [c["step"] for c in got[1:4]] == [1, 2, 3] and got[-1]["exit"] == "preempted"
    assert got[1]["values"]["train/loss"] == read_metrics(cfg.output_dir)[0]["loss"]  # TensorBoard's names


def test_tensorboard_gets_the_config_as_text_and_hparams(tmp_path, data16):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    cfg = tiny_config(tmp_path / "run", data16, "train.max_steps=2", "data.batch_size=4")
    train(cfg)
    values = {}  # tag -> (plugin name, summary value) over every event file of the run
    for f in glob.glob(str(tmp_path / "run" / "tb" / "**" / "events.out.tfevents.*"), recursive=True):
        for ev in EventFileLoader(f).Load():
            for v in ev.summary.value:
                values[v.tag] = (v.metadata.plugin_data.plugin_name, v)
    assert values["train/loss"][0] == "scalars"
    plugin, text = values["config/text_summary"]
    assert plugin == "text"
    body = text.tensor.string_val[0].decode()
    assert "batch_size: 4" in body and "max_steps: 2" in body
    assert values["_hparams_/experiment"][0] == "hparams" and values["_hparams_/session_start_info"][0] == "hparams"
    from tensorboard.plugins.hparams import plugin_data_pb2
    start = plugin_data_pb2.HParamsPluginData.FromString(
        values["_hparams_/session_start_info"][1].metadata.plugin_data.content).session_start_info
    assert start.hparams["data.batch_size"].number_value == 4
    assert start.hparams["model.arch"].string_value == "vit_tiny_cpu"
    # the HParams table's metric columns: the finished run's final figures
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        values["_hparams_/experiment"][1].metadata.plugin_data.content).experiment
    names = {m.name.tag for m in exp.metric_infos}
    assert {"final/loss", "final/lr", "final/loss_spatial"} <= names
    last = read_metrics(cfg.output_dir)[-1]
    from tensorboard.util.tensor_util import make_ndarray

    def number(v):
        return v.simple_value if v.WhichOneof("value") == "simple_value" else make_ndarray(v.tensor).item()
    assert number(values["final/loss"][1]) == pytest.approx(last["loss"], rel=1e-6)
    assert number(values["final/lr"][1]) == pytest.approx(last["lr"], rel=1e-6)


def test_real_wandb_offline_run_records_config_and_scalars(tmp_path, data16):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sere_scale", "train",
           *tiny_overrides(run, data16, "train.max_steps=2", "data.batch_size=4", "log.wandb.enabled=true",
                           "log.wandb.project=sere_test")]
    res = subprocess.run(cmd, env=subprocess_env(WANDB_MODE="offline", WANDB_SILENT="true"), capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    files = glob.glob(str(run / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1
    data = open(files[0], "rb").read()  # wandb's record log: protobuf with JSON values, readable as bytes
    assert b"train/loss" in data and b"train/img_per_s" in data
    assert b'"batch_size":4' in data and b"vit_tiny_cpu" in data and b"sere_test" in data


def test_hook_finishes_when_the_process_exits_without_the_loop_closing(tmp_path, data16):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "sere_scale", "train",
           *tiny_overrides(run, data16, "train.max_steps=4", "data.batch_size=4",
                           "log.hooks=[tests.fake_tracker:recorder]")]
    res = subprocess.run(cmd, env=subprocess_env(SERE_FAKE_TRACKER_EXIT_AT="2"), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 5, res.stderr[-3000:]
    assert [c["call"] for c in calls(run)] == ["start", "log", "log", "finish"]
    assert calls(run)[-1]["exit"] == "exited"


def test_mlflow_tracker_calls(tmp_path, data16, monkeypatch):
    """The MLflow tracker through a fake ``mlflow`` module recording calls (no server here)."""
    rec = []
    mod = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "log_params", "log_dict", "log_metrics", "set_tag", "end_run"):
        setattr(mod, name, (lambda n: lambda *a, **kw: rec.append((n, a, kw)))(name))

    def start_run(**kw):
        rec.append(("start_run", (), kw))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

    class Client:
        def __init__(self, tracking_uri):
            rec.append(("MlflowClient", (tracking_uri,), {}))

        def search_experiments(self, max_results):
            rec.append(("search_experiments", (), {}))
    mod.start_run, mod.MlflowClient, mod.get_tracking_uri = start_run, Client, lambda: "file:///tmp/x"
    monkeypatch.setitem(sys.modules, "mlflow", mod)
    cfg = tiny_config(tmp_path / "run", data16, "train.max_steps=2", "data.batch_size=4", "log.mlflow.enabled=true",
                      "log.mlflow.tracking_uri=file:///tmp/x", "log.mlflow.experiment=exp")
    train(cfg)
    names = [n for n, _, _ in rec]
    assert names == ["MlflowClient", "search_experiments", "set_tracking_uri", "set_experiment", "start_run",
                     "log_params", "log_dict", "log_metrics", "log_metrics", "set_tag", "end_run"]
    assert rec[0][1] == ("file:///tmp/x",) and rec[3][1] == ("exp",) and rec[4][2] == {"run_name": "run"}
    params = rec[5][1][0]
    assert params["data.batch_size"] == 4 and params["model.arch"] == "vit_tiny_cpu"
    rows = read_metrics(cfg.output_dir)
    for (_, a, kw), r in zip(rec[7:9], rows):
        assert kw["step"] == r["step"] and a[0]["train/loss"] == r["loss"]  # the names TensorBoard and W&B get
    assert rec[-2][1] == ("exit", "done") and rec[-1][2] == {"status": "FINISHED"}
    assert json.loads((tmp_path / "run" / "trackers.json").read_text())["mlflow"]["run_id"] == "r1"
