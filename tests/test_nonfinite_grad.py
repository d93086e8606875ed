"""A non-finite gradient norm with finite losses is a non-finite step (issue 23, item 1): never applied, stopped
or skipped per ``train.nonfinite``, logged with its step number; and no checkpoint with NaN/inf is ever made
``latest`` (the save refuses it). In one process under DDP; FSDP and ZeRO are covered by tests/test_engines.py's
one-rank launch."""
import shutil

import pytest
import torch

from sere_scale.engine.checkpoint import CheckpointManager, NonFiniteCheckpointError, find_latest
from sere_scale.method.sere_method import SEREMethod
from sere_scale.run.metrics import read_metrics
from sere_scale.run.nonfinite import NonFiniteLoss
from sere_scale.run.train import train
from tests.conftest import digits_subset
from tests.dist.engines_run import InfGrad  # identity forward, inf gradients: finite loss, non-finite gradients
from tests.test_train import _tensors  # every tensor of a nested checkpoint dict, by path
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    return digits_subset(digits_root, tmp_path_factory.mktemp("small"), 3, 12)


def bad_at(call, kind):
    """A method whose ``call``-th forward (from 1) has a NaN loss (``kind="loss"``) or a finite loss with
    inf gradients (``kind="grad"``)."""
    class Bad(SEREMethod):
        calls = 0

        def forward(self, *a, **k):
            out = super().forward(*a, **k)
            Bad.calls += 1
            if Bad.calls == call:
                out["loss"] = out["loss"] * float("nan") if kind == "loss" else InfGrad.apply(out["loss"])
            return out
    return Bad


def _checkpoint_tensors(ck):
    return dict(_tensors(torch.load(ck / "model.pt", weights_only=False)))


def test_reproduction_huge_lr_stops_before_applying_a_nonfinite_gradient(tmp_path, small_data):
    """The issue's reproduction: optim.base_lr=1e6, train.nonfinite=stop, DDP fp32, 1 process,
    checkpoint.every_steps=3: the run stops on the first non-finite gradient norm (its losses still finite) and
    every checkpoint written holds only finite tensors."""
    run = tmp_path / "run"
    cfg = tiny_config(run, small_data, "optim.base_lr=1e6", "optim.warmup_epochs=0", "train.nonfinite=stop",
                      "checkpoint.every_steps=3", "train.max_steps=12")
    with pytest.raises(NonFiniteLoss, match=r"non-finite gradient norm .* at step (\d+)") as e:
        train(cfg)
    rows = read_metrics(run)
    assert all(r["grad_norm"] is not None for r in rows)  # every logged (applied) step had a finite norm
    assert all(r.get("loss") is not None for r in rows)
    step = int(str(e.value).split(" at step ")[1].split()[0])
    assert [r["step"] for r in rows] == list(range(1, step))
    cks = sorted((run / "checkpoints").glob("step_*"))
    assert cks and find_latest(run).name == f"step_{step - 1:08d}"
    for ck in cks:
        for k, v in _checkpoint_tensors(ck).items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), (ck.name, k)


def test_nonfinite_gradient_stop_keeps_the_state_before_the_step(tmp_path, small_data):
    """Inf gradients (finite loss) in step 3: the checkpoint is exactly that of a run stopped after step 2."""
    ref = tmp_path / "ref"
    train(tiny_config(ref, small_data, "train.max_steps=2", "checkpoint.every_steps=2"))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="non-finite gradient norm .* at step 3 .*after step 2"):
        train(tiny_config(run, small_data, "train.max_steps=6", "checkpoint.every_steps=5"),
              method_cls=bad_at(3, "grad"))
    assert find_latest(run).name == "step_00000002"
    got, want = _checkpoint_tensors(find_latest(run)), _checkpoint_tensors(ref / "checkpoints" / "step_00000002")
    assert got.keys() == want.keys()
    for k in got:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_gradient_skip_equals_a_nonfinite_loss_skip(tmp_path, small_data, caplog, precision):
    """train.nonfinite=skip: a step whose gradients are inf (loss finite) is dropped exactly as one whose loss
    is NaN (the established skip): same weights, teacher, buffers and centers afterwards; logged as step 3 with
    a null gradient norm; the warning names step 3."""
    common = ["train.max_steps=5", "train.nonfinite=skip", "checkpoint.every_steps=5", f"train.precision={precision}"]
    train(tiny_config(tmp_path / "loss", small_data, *common), method_cls=bad_at(3, "loss"))
    with caplog.at_level("WARNING"):
        train(tiny_config(tmp_path / "grad", small_data, *common), method_cls=bad_at(3, "grad"))
    assert any("non-finite gradient at step 3: step skipped" in r.message for r in caplog.records)
    rows = read_metrics(tmp_path / "grad")
    assert [r["step"] for r in rows if r.get("skipped")] == [3]
    assert rows[2]["grad_norm"] is None and "grad_norm" in rows[2]["nonfinite"] and rows[2]["loss"] is not None
    assert rows[-1]["n_skipped"] == 1
    a = _checkpoint_tensors(tmp_path / "loss" / "checkpoints" / "step_00000005")
    b = _checkpoint_tensors(tmp_path / "grad" / "checkpoints" / "step_00000005")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert not b[k].is_floating_point() or torch.isfinite(b[k]).all(), k


def test_a_poisoned_state_is_never_saved(tmp_path, small_data):
    """The last line of defence: a NaN in a BatchNorm buffer of the teacher makes the save refuse, naming it;
    no folder is left and 'latest' still names the last good checkpoint."""
    run = tmp_path / "run"
    out = train(tiny_config(run, small_data, "train.max_steps=2", "checkpoint.every_steps=2"))
    eng = out["engine"]
    name, buf = next((n, b) for n, b in eng.teacher_module.named_buffers() if "running_var" in n)
    buf.view(-1)[0] = float("nan")
    mgr = CheckpointManager(run, keep=2, is_main=True, meta={})
    with pytest.raises(NonFiniteCheckpointError, match=f"teacher.{name}") as e:
        mgr.save(eng, {"step": 3, "epoch": 0, "batch": 0})
    assert "step_00000002" in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000002"]
    assert find_latest(run).name == "step_00000002"
    buf.view(-1)[0] = 1.0  # finite again: the same save goes through
    assert mgr.save(eng, {"step": 3, "epoch": 0, "batch": 0}).name == "step_00000003"
    shutil.rmtree(run)
