"""``sere-scale export``: the teacher backbone as timm weights; the printed ``timm.create_model`` call loads
them strictly and reproduces the training model's teacher features."""
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sere_scale.export.timm_dir import export_timm
from sere_scale.engine.ddp import read_ddp_teacher
from sere_scale.engine.readers import TEACHER_READERS
from sere_scale.eval.features import eval_transform
from sere_scale.models.load import load_teacher
from tests.conftest import subprocess_env
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, digits_root):
    """A 2-step iBOT+SERE run (its backbone carries a mask token that timm does not know)."""
    from sere_scale.run.train import train
    run = tmp_path_factory.mktemp("export") / "run"
    # eval size 48 ≠ global size 32 ≠ timm's stock 224: the exported preprocessing must be the run's
    train(tiny_config(run, digits_root / "train", "train.max_steps=2", "eval.eval_size=48"))
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
    meta.pop("files")  # the fake folder holds none of the DDP files the real meta.json lists (verify would skip it)
    (fake / "meta.json").write_text(json.dumps({**meta, "backend": "sharded_test"}))
    calls = []

    def reader(d):
        calls.append(d)
        return read_ddp_teacher(ck)
    monkeypatch.setitem(TEACHER_READERS, "sharded_test", reader)
    a = load_file(export_timm(tmp_path, tmp_path / "a.safetensors")["file"])
    b = load_file(export_timm(run_dir, tmp_path / "b.safetensors")["file"])
    assert calls == [fake] and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _ckpt_state(run_dir):
    return torch.load(next((run_dir / "checkpoints").glob("step_*")) / "model.pt", weights_only=False)


def _assert_same_transform(model, size):
    """timm's resolve_data_config + create_transform of ``model`` gives our eval transform's tensors."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    dc = resolve_data_config(model=model)
    assert dc["input_size"] == (3, size, size) and dc["crop_pct"] == 1.0 and dc["interpolation"] == "bicubic"
    theirs, ours = create_transform(**dc), eval_transform(size)
    rng = np.random.default_rng(0)
    for hw in ((61, 90), (48, 48), (130, 70)):  # wide, square, tall: resize short side, center crop
        img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        a, b = theirs(img), ours(img)
        assert a.shape == (3, size, size)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_timm_dir_export_loads_with_one_argument_strict_same_features_and_transform(run_dir, tmp_path):
    import timm
    out = tmp_path / "s16_timm"
    r = subprocess.run([sys.executable, "-m", "sere_scale", "export", "--checkpoint", str(run_dir), str(out)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert f"timm.create_model('local-dir:{out}', pretrained=True)" in r.stdout
    conf = json.loads((out / "config.json").read_text())
    assert conf["architecture"] == "vit_small_patch16_224" and conf["num_classes"] == 0
    assert conf["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and conf["pretrained_cfg"]["crop_pct"] == 1.0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())
    _assert_same_transform(model, 48)
    _, net = load_teacher(run_dir)
    torch.manual_seed(0)
    for size in (32, 48):  # training size and the exported eval size
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref, tokens = net.backbone(x), model.forward_features(x)
        torch.testing.assert_close(tokens[:, 0], ref["cls"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tokens[:, 1:], ref["patch"], rtol=1e-5, atol=1e-5)
    # strict: a missing tensor in the folder fails the one-argument load
    state = load_file(str(out / "model.safetensors"))
    del state["norm.bias"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(RuntimeError, match="norm.bias"):
        timm.create_model(f"local-dir:{out}", pretrained=True)


def test_single_file_export_carries_the_same_pretrained_cfg(run_dir, tmp_path):
    res = export_timm(run_dir, tmp_path / "t.safetensors")
    assert res["format"] == "safetensors"
    model = _create(res["call"])
    _assert_same_transform(model, 48)
    from safetensors import safe_open
    with safe_open(res["file"], "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["pretrained_cfg"])["input_size"] == [3, 48, 48] and meta["weights"] == "teacher"


def test_student_and_teacher_exports_hold_their_own_weights(run_dir, tmp_path):
    sd = _ckpt_state(run_dir)
    t = load_file(str(export_timm(run_dir, tmp_path / "t", weights="teacher")["file"]) + "/model.safetensors")
    s = load_file(str(export_timm(run_dir, tmp_path / "s", weights="student")["file"]) + "/model.safetensors")
    assert t.keys() == s.keys()
    for k in t:
        assert torch.equal(t[k], sd["teacher"]["backbone.vit." + k])
        assert torch.equal(s[k], sd["student"]["backbone.vit." + k])
    assert not torch.equal(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])
    conf = json.loads((tmp_path / "s" / "config.json").read_text())
    assert conf["pretrained_cfg"]["tag"] == "sere_student"


def test_timm_dir_export_never_replaces_a_foreign_folder(run_dir, tmp_path):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a timm-dir export"):
        export_timm(run_dir, keep)
    assert (keep / "notes.txt").read_text() == "mine" and not (tmp_path / "mine.tmp").exists()
    export_timm(run_dir, tmp_path / "again")
    export_timm(run_dir, tmp_path / "again")  # a previous export is replaced
