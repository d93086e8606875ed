"""``sere-scale export``: the teacher backbone as timm weights; the printed ``timm.create_model`` call loads
them strictly and reproduces the training model's teacher features."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sere_scale.export import export_timm
from sere_scale.engine.ddp import read_ddp_teacher
from sere_scale.engine.readers import TEACHER_READERS
from sere_scale.models.load import load_teacher
from tests.conftest import subprocess_env
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    """A 2-step iBOT+SERE run (its backbone carries a mask token that timm does not know)."""
    from sere_scale.train import train
    run = tmp_path_factory.mktemp("export") / "run"
    train(tiny_config(run, digits_root / "train", "train.max_steps=2"))
    return run


def _create(call: str):
    import timm
    return eval(call, {"timm": timm})


def test_cli_export_then_printed_call_gives_the_teacher_features(run_dir, tmp_path):
    out = tmp_path / "teacher.safetensors"
    r = subprocess.run([sys.executable, "-m", "sere_scale", "export", "--checkpoint", str(run_dir), "--out",
                        str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    call = re.search(r"^model = (timm\.create_model\(.*\))$", r.stdout, re.MULTILINE).group(1)
    assert "'vit_small_patch16_224'" in call and "patch_size=8" in call and "depth=2" in call
    model = _create(call).eval()
    _, net = load_teacher(run_dir)
    assert net.backbone.mask_token is not None  # trained with one; not exported
    assert set(load_file(str(out))) == set(model.state_dict())
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = net.backbone(x)
        tokens = model.forward_features(x)
    assert tokens.shape == (4, 17, 64)
    torch.testing.assert_close(tokens[:, 0], ref["cls"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens[:, 1:], ref["patch"], rtol=1e-5, atol=1e-5)
    # the export is of the teacher (EMA), not the student
    sd = torch.load(next((run_dir / "checkpoints").glob("step_*")) / "model.pt", weights_only=False)
    w = load_file(str(out))["blocks.0.attn.qkv.weight"]
    assert torch.equal(w, sd["teacher"]["backbone.vit.blocks.0.attn.qkv.weight"])
    assert not torch.equal(w, sd["student"]["backbone.vit.blocks.0.attn.qkv.weight"])


def test_the_printed_call_loads_strictly(run_dir, tmp_path):
    res = export_timm(run_dir, tmp_path / "ok.safetensors")
    state = load_file(res["file"])
    missing = dict(state)
    del missing["norm.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(RuntimeError, match="norm.weight"):
        _create(res["call"].replace("ok.safetensors", "missing.safetensors"))
    extra = {**state, "extra.weight": torch.zeros(3)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(RuntimeError, match="extra.weight"):
        _create(res["call"].replace("ok.safetensors", "extra.safetensors"))


def test_export_reads_through_the_backend_registry(run_dir, tmp_path, monkeypatch):
    """Any backend whose reader is registered in TEACHER_READERS exports the same file."""
    ck = next((run_dir / "checkpoints").glob("step_*"))
    fake = tmp_path / "checkpoints" / ck.name
    fake.mkdir(parents=True)
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    meta = json.loads((ck / "meta.json").read_text())
    (fake / "meta.json").write_text(json.dumps({**meta, "backend": "sharded_test"}))
    calls = []

    def reader(d):
        calls.append(d)
        return read_ddp_teacher(ck)
    monkeypatch.setitem(TEACHER_READERS, "sharded_test", reader)
    a = load_file(export_timm(tmp_path, tmp_path / "a.safetensors")["file"])
    b = load_file(export_timm(run_dir, tmp_path / "b.safetensors")["file"])
    assert calls == [fake] and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
