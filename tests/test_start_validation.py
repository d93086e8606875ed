"""Bad configs and data are refused at load time or before the first write, naming the key (exit code 2, no
traceback), and leave no trace in the run folder."""
import subprocess
import sys

import pytest

from sere_scale.config.load import ConfigError, load_config
from sere_scale.run.train import train
from tests.conftest import digits_subset, subprocess_env
from tests.tiny import TINY, tiny_config, tiny_overrides


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


@pytest.mark.parametrize("override, key", [
    ("sere.heads=0", "sere.heads"), ("sere.heads=-2", "sere.heads"), ("train.log_every=0", "train.log_every"),
    ("data.num_workers=-1", "data.num_workers"), ("train.max_consecutive_skips=0", "train.max_consecutive_skips"),
])
def test_bad_values_are_refused_at_load_time(override, key):
    with pytest.raises(ConfigError, match=f"'{key}': must be"):
        load_config(None, [*TINY, override])


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  log_every: [1, 2\nmodel:\n  depth: 2\n")
    with pytest.raises(ConfigError, match=rf"{bad}:\d+:\d+: malformed YAML"):
        load_config(bad)
    r = subprocess.run([sys.executable, "-m", "sere_scale", "train", "-c", str(bad)], env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "malformed YAML" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("extra, key", [
    (["sere.heads=3"], "sere.heads"),  # 3 relation heads do not divide the width 64
    (["model.num_heads=3", "model.embed_dim=48", "sere.heads=5"], "sere.heads"),
    (["data.global_size=36"], "data.global_size"),  # patch 8
    (["data.batch_size=64"], "data.batch_size"),  # 36 images: not one global batch
    (["train.grad_accum=8"], "train.grad_accum"),  # 4 batches an epoch
])
def test_model_and_data_problems_are_found_before_anything_is_written(tmp_path, small_data, extra, key):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=f"'{key}'"):
        train(tiny_config(run, small_data, *extra))
    assert not run.exists()


def test_an_empty_data_folder_is_a_config_error(tmp_path):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    for data in (tmp_path / "empty", tmp_path / "empty" / "class_a", tmp_path / "missing"):
        with pytest.raises(ConfigError, match="'data.path'"):
            train(tiny_config(tmp_path / "run", data))
        assert not (tmp_path / "run").exists()


def test_a_start_up_config_error_exits_2_without_a_traceback(tmp_path, small_data):
    r = subprocess.run([sys.executable, "-m", "sere_scale", "train",
                        *tiny_overrides(tmp_path / "run", small_data, "sere.heads=3")],
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "'sere.heads'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "run").exists()
