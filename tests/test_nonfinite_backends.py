"""Every backend (DDP, FSDP, ZeRO-1/2/3) drops a non-finite step without a trace (issue 23, items 1 and 2), in one
1-rank torchrun launch (``tests/dist/engines_run.py``; the launch's timeout is the watchdog):

* NaN crops in step 3 (the forward writes NaN into the BatchNorm running statistics of the relation heads,
  student and teacher): under ``train.nonfinite=skip`` the step is logged as step 3, the buffers are restored,
  every checkpoint tensor is finite and each backend's teacher and curve equal DDP's;
* inf gradients with a finite loss in step 3 (``skip``): the same step dropped (FSDP by the vote, DeepSpeed by
  ZeRO's own norm check), the curve equal to the NaN-crop run's;
* the same in step 5 under ``stop``: the run stops naming step 5 and its checkpoint (after step 4) is finite
  and equals DDP's.
"""
import pytest
import torch

from sere_scale.engine.checkpoint import find_latest
from sere_scale.engine.readers import read_state
from sere_scale.run.metrics import read_metrics
from tests.test_engines import CURVE_KEYS, assert_same_curve, overrides, run_jobs

pytestmark = pytest.mark.slow  # one 1-rank launch of 13 runs
NAMES = ("ddp", "fsdp", "zero1", "zero2", "zero3")
ONE = ["train.grad_accum=1", "checkpoint.every_steps=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data48):
    tmp = tmp_path_factory.mktemp("nonfinite_backends")
    skip, stop = ["train.nonfinite=skip", *ONE], ["train.nonfinite=stop", *ONE]
    jobs = []
    for n in NAMES:
        jobs.append({"name": f"bn_{n}", "overrides": overrides(tmp / f"bn_{n}", data48, n, *skip),
                     "nan_input_at": [3]})
        jobs.append({"name": f"grad_{n}", "overrides": overrides(tmp / f"grad_{n}", data48, n, *skip),
                     "inf_grad_at": 3})
    for n in ("ddp", "fsdp", "zero3"):
        jobs.append({"name": f"stop_{n}", "overrides": overrides(tmp / f"stop_{n}", data48, n, *stop),
                     "inf_grad_at": 5, "raises": "NonFiniteLoss"})
    return tmp, run_jobs(tmp, 1, jobs, timeout=900)


def _finite_state(ck) -> dict:
    """Teacher (parameters and buffers) of a checkpoint of any backend, every tensor checked finite; the student
    checked too."""
    for weights in ("student", "teacher"):
        sd = read_state(ck, weights)
        for k, v in sd.items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (str(ck), weights, k)
    return sd


def _assert_close(a: dict, b: dict, where):
    assert a.keys() == b.keys(), where
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=2e-5, atol=1e-6), (where, k)


@pytest.mark.parametrize("name", NAMES)
def test_buffers_are_restored_after_a_nan_forward(runs, name):
    tmp, _ = runs
    rows = read_metrics(tmp / f"bn_{name}")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["step"] for r in rows if r.get("skipped")] == [3] and rows[-1]["n_skipped"] == 1
    ref = _finite_state(tmp / "bn_ddp" / "checkpoints" / "step_00000006")
    for step in (3, 6):
        sd = _finite_state(tmp / f"bn_{name}" / "checkpoints" / f"step_{step:08d}")
        assert any("running_var" in k for k in sd)
        if step == 6:
            _assert_close(sd, ref, name)
    kept = [r for r in rows if not r.get("skipped")]
    ddp = [r for r in read_metrics(tmp / "bn_ddp") if not r.get("skipped")]
    for ra, rb in zip(ddp, kept):
        for k in CURVE_KEYS:
            assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-7), (name, ra["step"], k)


@pytest.mark.parametrize("name", NAMES)
def test_a_nonfinite_gradient_is_skipped_on_every_backend(runs, name):
    tmp, _ = runs
    rows = read_metrics(tmp / f"grad_{name}")
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert rows[2]["grad_norm"] is None and rows[2]["loss"] is not None  # finite loss, non-finite gradient
    ref = read_metrics(tmp / "bn_ddp")
    for ra, rb in zip(ref, rows):
        if ra["step"] != 3:
            for k in CURVE_KEYS:
                assert rb[k] == pytest.approx(ra[k], rel=2e-5, abs=1e-7), (name, ra["step"], k)
    _assert_close(_finite_state(tmp / f"grad_{name}" / "checkpoints" / "step_00000006"),
                  _finite_state(tmp / "bn_ddp" / "checkpoints" / "step_00000006"), name)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_a_nonfinite_gradient_stops_on_every_backend(runs, name):
    tmp, rep = runs
    assert "non-finite gradient norm" in rep[f"stop_{name}"]["raised"]
    assert "at step 5 " in rep[f"stop_{name}"]["raised"]
    latest = find_latest(tmp / f"stop_{name}")
    assert latest.name == "step_00000004"
    _assert_close(_finite_state(latest), _finite_state(find_latest(tmp / "stop_ddp")), name)
    assert_same_curve(tmp / "stop_ddp", tmp / f"stop_{name}", rel=2e-5)
