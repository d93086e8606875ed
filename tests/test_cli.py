import subprocess
import sys

from tests.conftest import subprocess_env


def run(*args):
    return subprocess.run([sys.executable, "-m", "sere_scale", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)


def test_config_error_names_the_key_and_exits_2():
    r = run("train", "train.max_step=3")
    assert r.returncode == 2
    assert "train.max_step" in r.stderr and "train.max_steps" in r.stderr


def test_train_then_knn_from_the_command_line(tmp_path, digits_root):
    from tests.tiny import tiny_overrides
    r = run("train", *tiny_overrides(tmp_path / "run", digits_root / "train", "train.max_steps=2"))
    assert r.returncode == 0, r.stderr[-2000:]
    r = run("knn", "--checkpoint", str(tmp_path / "run"), "--train-data", str(digits_root / "train"),
            "--val-data", str(digits_root / "val"), "--k", "5")
    assert r.returncode == 0, r.stderr[-2000:]
    import json
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 <= res["top1"] <= 100 and res["n_val"] == 359 and res["top1"] > 15  # 10 classes: chance is 10%
