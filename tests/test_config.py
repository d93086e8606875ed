import pytest
import yaml

from sere_scale.config import Config, ConfigError, load_config, save_config

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
