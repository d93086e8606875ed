"""Every reader of a run folder reads checkpoints the way ``--resume`` does (issue 23, item 4): the sizes
meta.json lists, unreadable files, a damaged newest checkpoint skipped with a warning naming it, the step used
logged; a damaged checkpoint folder named explicitly is a clear error (exit code 2), never a zip traceback.
Reproduction: the newest ``model.pt`` truncated, then ``sere-scale export`` and ``sere-scale knn``."""
import json
import logging
import shutil

import pytest
import torch

from sere_scale.cli import main
from sere_scale.engine.readers import read_state
from sere_scale.models.source import load_backbone
from sere_scale.run.train import train
from tests.conftest import digits_subset
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    """A DDP run with checkpoints at steps 3 and 6 (read-only for the tests: each copies it)."""
    tmp = tmp_path_factory.mktemp("readers")
    data = digits_subset(digits_root, tmp / "data", 3, 12)
    train(tiny_config(tmp / "run", data, "train.max_steps=6", "checkpoint.every_steps=3"))
    return tmp / "run"


@pytest.fixture
def damaged(run_dir, tmp_path):
    """A copy of the run whose newest model.pt is truncated to half its size."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    f = run / "checkpoints" / "step_00000006" / "model.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return run


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def test_export_falls_back_past_a_truncated_newest_checkpoint(damaged, tmp_path, caplog):
    out = tmp_path / "export"
    with caplog.at_level(logging.INFO, logger="sere_scale"):
        assert main(["export", "--checkpoint", str(damaged), str(out)]) == 0
    msgs = _messages(caplog)
    assert any("step_00000006 is corrupt" in m and "model.pt" in m and "falling back" in m for m in msgs), msgs
    assert any("step 3 from" in m and "step_00000003" in m for m in msgs), msgs
    # the exported weights are step 3's teacher (read directly from that folder)
    from safetensors.torch import load_file
    got = load_file(out / "model.safetensors")
    ref = read_state(damaged / "checkpoints" / "step_00000003", "teacher")
    key = "cls_token"
    assert torch.equal(got[key], ref[f"backbone.vit.{key}"])


def test_knn_falls_back_and_says_which_step(damaged, digits_root, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="sere_scale"):
        rc = main(["knn", "--checkpoint", str(damaged), "--train-data", str(digits_root / "train"),
                   "--val-data", str(digits_root / "val"), "--k", "5"])
    assert rc == 0
    assert "top1" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    msgs = _messages(caplog)
    assert any("step_00000006 is corrupt" in m for m in msgs), msgs
    assert any("the teacher of step 3 from" in m for m in msgs), msgs


def test_load_backbone_and_missing_meta_fall_back_too(run_dir, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "step_00000006" / "meta.json").unlink()
    with caplog.at_level(logging.INFO, logger="sere_scale"):
        vit = load_backbone(run)
    assert any("step 3 from" in m for m in _messages(caplog))
    ref = read_state(run / "checkpoints" / "step_00000003", "teacher")
    assert torch.equal(vit.state_dict()["cls_token"], ref["backbone.vit.cls_token"])


def test_a_damaged_checkpoint_named_explicitly_is_a_clear_error(damaged, tmp_path, capsys):
    ck = damaged / "checkpoints" / "step_00000006"
    assert main(["export", "--checkpoint", str(ck), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "step_00000006 (step 6) is damaged" in err and "model.pt has" in err and "Traceback" not in err, err
    # same damage, sizes unrecorded (an older checkpoint without a file list): the unpickling error, named
    meta = json.loads((ck / "meta.json").read_text())
    meta.pop("files")
    (ck / "meta.json").write_text(json.dumps(meta))
    assert main(["export", "--checkpoint", str(ck), str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "step_00000006 (step 6) is damaged" in err and "Traceback" not in err, err


def test_no_readable_checkpoint_at_all(damaged, tmp_path, capsys):
    f = damaged / "checkpoints" / "step_00000003" / "model.pt"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["export", "--checkpoint", str(damaged), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint under" in err and "(step_00000006, step_00000003 are damaged)" in err, err
