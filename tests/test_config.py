import json
import pytest
import yaml

from sere_scale.config.load import Config, ConfigError, load_config, save_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_required_keys_exist_with_their_names():
    cfg = load_config(None, ["output_dir=/tmp/x", "train.max_steps=7", "checkpoint.every_steps=3"])
    assert cfg.output_dir == "/tmp/x" and cfg.train.max_steps == 7 and cfg.checkpoint.every_steps == 3


def test_unknown_key_names_the_key_and_the_closest():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.max_step=3"])
    assert "train.max_step" in str(e.value) and "train.max_steps" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["optim.bse_lr=1"])
    assert "optim.base_lr" in str(e.value)


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "data.batchsize" in str(e.value) and "data.batch_size" in str(e.value)


def test_type_and_choice_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(None, ["data.batch_size=abc"])
    with pytest.raises(ConfigError, match="engine.backend"):
        load_config(None, ["engine.backend=horovod"])
    with pytest.raises(ConfigError, match="data.n_global"):
        load_config(None, ["data.n_global=1"])
    with pytest.raises(ConfigError, match="data.global_scale"):
        load_config(None, ["data.global_scale=[0.5, 2.0]"])


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.base_lr=1e-3", "data.global_scale=[0.3, 1]", "train.max_steps=null",
                             "data.photometric=false"])
    assert cfg.optim.base_lr == pytest.approx(1e-3) and isinstance(cfg.optim.base_lr, float)
    assert cfg.data.global_scale == (0.3, 1.0)
    assert cfg.train.max_steps is None and cfg.data.photometric is False


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["sere.alpha=0.7", "model.arch=vit_base"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_loads(name):
    cfg = load_config(ROOT / "configs" / name)
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert cfg.output_dir == raw.get("output_dir", cfg.output_dir)


# ------------------------------------------------------------------ interpolation, merging, `sere-scale config`
def _cli(*args, env_extra=None):
    import subprocess
    import sys

    from tests.conftest import subprocess_env
    return subprocess.run([sys.executable, "-m", "sere_scale", *args], capture_output=True, text=True,
                          env=subprocess_env(**(env_extra or {})), timeout=120)


def test_env_and_key_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("SERE_TEST_DATA", "/datasets/in1k")
    monkeypatch.setenv("SERE_TEST_STEPS", "123")
    monkeypatch.delenv("SERE_TEST_UNSET", raising=False)
    p = tmp_path / "c.yaml"
    p.write_text("output_dir: ${oc.env:SERE_TEST_UNSET,runs/fallback}/x\n"
                 "data:\n  path: ${oc.env:SERE_TEST_DATA}/train\n  batch_size: 16\n"
                 "train:\n  max_steps: ${oc.env:SERE_TEST_STEPS}\n"
                 "eval:\n  val_path: ${oc.env:SERE_TEST_DATA}/val\n  knn_train_path: ${data.path}\n"
                 "  eval_size: ${data.global_size}\n")
    cfg = load_config(p, ["data.global_size=96"])
    assert cfg.output_dir == "runs/fallback/x"
    assert cfg.data.path == "/datasets/in1k/train" and cfg.eval.val_path == "/datasets/in1k/val"
    assert cfg.eval.knn_train_path == "/datasets/in1k/train"
    assert cfg.train.max_steps == 123 and isinstance(cfg.train.max_steps, int)  # env strings typed by the key
    assert cfg.eval.eval_size == 96  # a key left at its default or set by an override resolves too
    assert load_config(None, ["eval.eval_size=${data.global_size}"]).eval.eval_size == 224
    p.write_text("data:\n  path: ${oc.env:SERE_TEST_UNSET}\n")
    with pytest.raises(ConfigError, match=r"'data.path'.*SERE_TEST_UNSET.*not found"):
        load_config(p)
    p.write_text("eval:\n  val_path: ${data.nope}\n")
    with pytest.raises(ConfigError, match=r"'eval.val_path'.*data.nope"):
        load_config(p)
    monkeypatch.setenv("SERE_TEST_STEPS", "many")
    with pytest.raises(ConfigError, match="train.max_steps.*integer"):
        load_config(None, ["train.max_steps=${oc.env:SERE_TEST_STEPS}"])


def test_several_files_merge_in_order_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data:\n  batch_size: 16\n  n_local: 4\n  global_scale: [0.3, 1.0]\noptim:\n  base_lr: 0.001\n")
    b.write_text("data:\n  batch_size: 32\n  global_scale: [0.5, 0.9]\ntrain:\n  epochs: 7\n")
    cfg = load_config([a, b], ["train.epochs=9"])
    assert cfg.data.batch_size == 32 and cfg.data.n_local == 4  # b wins key by key, a's other keys stay
    assert cfg.data.global_scale == (0.5, 0.9) and cfg.optim.base_lr == 0.001
    assert cfg.train.epochs == 9  # overrides last
    assert load_config([b, a]).data.batch_size == 16
    b.write_text("data:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match="data.batchsize.*data.batch_size"):
        load_config([a, b])


def test_config_command_prints_the_resolved_validated_yaml(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("data:\n  path: ${oc.env:SERE_TEST_DATA,/d}/train\n  batch_size: 16\n")
    b.write_text("data:\n  batch_size: 32\n")
    r = _cli("config", "-c", str(a), "-c", str(b), "train.max_steps=5", env_extra={"SERE_TEST_DATA": "/x"})
    assert r.returncode == 0, r.stderr
    out = yaml.safe_load(r.stdout)
    assert out["data"]["path"] == "/x/train" and out["data"]["batch_size"] == 32
    assert out["train"]["max_steps"] == 5 and out["model"]["arch"] == "vit_small_patch16_224"
    assert load_config(None, _flatten(out)).to_dict() == out  # a full, valid config
    r = _cli("config", "-c", str(a), "optim.bse_lr=1")
    assert r.returncode == 2 and "optim.base_lr" in r.stderr and r.stdout == ""


def _flatten(d, prefix=""):
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, prefix + k + ".")
        else:
            out.append(f"{prefix}{k}={json.dumps(v)}")
    return out


def test_model_arch_is_checked_with_did_you_mean():
    with pytest.raises(ConfigError, match=r"model.arch.*vit_smal_patch16_224.*did you mean 'vit_small_patch16_224'"):
        load_config(None, ["model.arch=vit_smal_patch16_224"])
    assert load_config(None, ["model.arch=vit_tiny_cpu"]).model.arch == "vit_tiny_cpu"
    assert load_config(None, ["model.arch=vit_base_patch16_224.augreg_in21k"]).model.arch


@pytest.mark.parametrize("bad", ["model.arch=vit_smal_patch16_224", "data.path=${oc.env:SERE_TEST_UNSET}"])
def test_train_writes_nothing_on_a_config_error(tmp_path, bad):
    run = tmp_path / "run"
    r = _cli("train", f"output_dir={run}", bad)
    assert r.returncode == 2, r.stderr
    assert "config error" in r.stderr and "Traceback" not in r.stderr
    assert not run.exists()


def test_a_shell_variable_in_a_value_is_an_error_naming_the_interpolation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  path: $DATA/train\n")
    with pytest.raises(ConfigError, match=r"'data.path'.*\$DATA.*\$\{oc.env:DATA\}"):
        load_config(p)
    assert load_config(None, ["output_dir=runs/a$$b"]).output_dir == "runs/a$$b"  # not a variable name
