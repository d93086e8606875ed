"""``engine.compile=true`` (``torch.compile`` of each transformer block, in place) on CPU with the default
backend (inductor; gcc builds its kernels), DDP engine, one process:

* the loss curve equals eager's to float tolerance (dropout paths off: inductor draws its own random numbers);
* parameter and state-dict names are unchanged (no ``_orig_mod``), so checkpoints are interchangeable: a run
  checkpointed eager resumes compiled and the other way round, each reproducing the uninterrupted curve.

FSDP with compile and activation checkpointing runs in tests/test_fp16.py's 2-rank launch.
"""
import shutil

import pytest
import torch

from sere_scale.engine.checkpoint import find_latest
from sere_scale.run.metrics import read_metrics
from sere_scale.run.train import train
import tests.capability as cap
from tests.test_engines import CURVE_KEYS
from tests.tiny import tiny_config
from tests.conftest import digits_subset

EXTRA = ["model.drop_path=0", "train.max_steps=6", "data.batch_size=4", "checkpoint.every_steps=3",
         "model.checkpoint_activations=true"]


@pytest.fixture(scope="module")
def data24(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("data24"), 3, 8)


def run(out, data, compiled: bool, resume_from=None):
    if resume_from is not None:  # a copy of that run, its latest checkpoint moved back to step 3
        shutil.copytree(resume_from, out)
        ck = out / "checkpoints"
        shutil.rmtree(ck / "step_00000006")
        (ck / "latest").write_text("step_00000003")
    cfg = tiny_config(out, data, *EXTRA, f"engine.compile={str(compiled).lower()}")
    return train(cfg, resume=resume_from is not None)


def assert_same(a_dir, b_dir, rel=1e-5):
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in CURVE_KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-7), (str(b_dir), ra["step"], k, ra[k], rb[k])


def test_compiled_blocks_reproduce_eager_and_checkpoints_are_interchangeable(tmp_path, data24):
    cap.require_inductor()
    eager = run(tmp_path / "eager", data24, False)
    compiled = run(tmp_path / "compiled", data24, True)
    blocks = compiled["engine"].student_module.backbone.vit.blocks
    assert all(b._compiled_call_impl is not None for b in blocks)  # really compiled, in place
    assert_same(tmp_path / "eager", tmp_path / "compiled")
    # the same names everywhere: modules, checkpoints (model.pt holds student, teacher, optimizer)
    e_net, c_net = eager["engine"].student_module, compiled["engine"].student_module
    assert [n for n, _ in e_net.named_parameters()] == [n for n, _ in c_net.named_parameters()]
    e_ck = torch.load(find_latest(tmp_path / "eager") / "model.pt", weights_only=False)
    c_ck = torch.load(find_latest(tmp_path / "compiled") / "model.pt", weights_only=False)
    for part in ("student", "teacher"):
        assert list(e_ck[part]) == list(c_ck[part]) and not any("_orig_mod" in k for k in c_ck[part])
    assert e_ck["optimizer"]["param_groups"] == c_ck["optimizer"]["param_groups"]
    # eager checkpoint → compiled resume, and compiled checkpoint → eager resume
    run(tmp_path / "eager_then_compiled", data24, True, resume_from=tmp_path / "eager")
    assert_same(tmp_path / "eager", tmp_path / "eager_then_compiled")
    run(tmp_path / "compiled_then_eager", data24, False, resume_from=tmp_path / "compiled")
    assert_same(tmp_path / "compiled", tmp_path / "compiled_then_eager")
