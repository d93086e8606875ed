"""``sere-scale segprobe`` and ``sere-scale davis`` end to end on tiny data made in the tests, from a run folder:
one JSON line out, files written, and ``davis --evaluate-only`` scoring the ground truth itself as J = F = 1."""
import json
import shutil
from pathlib import Path

from test_propagation import _tiny_davis
from test_seg_probes import toy_folder

from sere_scale.cli import main

RUN = Path(__file__).parent / "fixtures" / "run_before_layout"


def _json_line(capsys) -> dict:
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_segprobe_nn_from_a_run_folder(tmp_path, capsys):
    data = toy_folder(tmp_path / "data", n_train=2, n_val=2)
    rc = main(["segprobe", "--checkpoint", str(RUN), "--data", str(data), "--method", "nn", "--size", "32",
               "--memory-size", "40", "--num-classes", "3", "--ignore-index", "255", "--out", str(tmp_path / "o")])
    assert rc == 0
    res = _json_line(capsys)
    assert res == json.loads((tmp_path / "o" / "segprobe.json").read_text())
    assert res["protocol"]["name"] == "hummingbird-nn" and res["protocol"]["patch_size"] == 8
    assert set(res) >= {"mIoU", "aAcc", "mAcc", "IoU"} and len(res["IoU"]) == 3


def test_davis_propagates_then_scores_and_evaluate_only_scores_any_folder(tmp_path, capsys):
    root = tmp_path / "davis"
    _tiny_davis(root)
    rc = main(["davis", "--checkpoint", str(RUN), "--data", str(root), "--short-side", "32",
               "--out", str(tmp_path / "res")])
    assert rc == 0
    res = _json_line(capsys)
    assert set(res) >= {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}
    assert res["objects"] == 2 and res["protocol"]["n_last_frames"] == 7
    assert sorted(p.name for p in (tmp_path / "res" / "box").iterdir()) == [f"{t:05d}.png" for t in range(4)]
    assert (tmp_path / "res" / "global_results-val.csv").exists()
    # the ground truth scored as a result: every object and frame perfect
    gt = tmp_path / "gt"
    shutil.copytree(root / "Annotations" / "480p", gt)
    assert main(["davis", "--evaluate-only", str(gt), "--data", str(root)]) == 0
    res = _json_line(capsys)
    assert res["J&F-Mean"] == 1.0 and res["J-Recall"] == 1.0 and res["F-Decay"] == 0.0
    assert main(["davis", "--data", str(root)]) == 2  # neither --checkpoint nor --evaluate-only


def test_dense_miou_during_training_equals_the_command_on_that_step(tmp_path, digits_root, capsys):
    from sere_scale.config.load import ConfigError, load_config
    from sere_scale.run.train import train
    from tests.tiny import tiny_config
    seg = toy_folder(tmp_path / "seg", n_train=2, n_val=2)
    run = tmp_path / "run"
    train(tiny_config(run, digits_root / "train", "train.max_steps=3", "checkpoint.every_steps=2",
                      "eval.dense_every=2", f"eval.dense_train_path={seg}", "eval.dense_num_classes=3",
                      "eval.dense_memory_size=40"))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "step" in r and "loss" in r]
    assert [("dense_miou" in r) for r in recs] == [False, True, False]
    assert main(["segprobe", "--checkpoint", str(run / "checkpoints" / "step_00000002"), "--data", str(seg),
                 "--method", "nn", "--size", "32", "--memory-size", "40", "--num-classes", "3",
                 "--ignore-index", "255"]) == 0
    res = _json_line(capsys)
    assert abs(100 * res["mIoU"] - recs[1]["dense_miou"]) < 1e-6
    import pytest
    with pytest.raises(ConfigError, match="dense_train_path"):
        load_config(None, ["eval.dense_every=5"])
