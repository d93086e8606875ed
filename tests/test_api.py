"""The public Python API: docs/API.md's two scripts run as written, and ``load_backbone`` gives the same
features from a run folder, its export and a weight file."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, subprocess_env

import sere_scale


def _doc_scripts() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "API.md").read_text(), re.S)


def test_every_public_name_resolves_and_is_documented():
    doc = (ROOT / "docs" / "API.md").read_text()
    for name in sere_scale.__all__:
        if name == "__version__":
            continue
        assert getattr(sere_scale, name) is not None
        assert f"`{name}" in doc or f"{name}`" in doc or f", {name}" in doc, f"{name} is not in docs/API.md"
    with pytest.raises(AttributeError):
        sere_scale.not_a_public_name  # noqa: B018


@pytest.mark.slow
def test_api_doc_scripts_train_then_extract_features(tmp_path, digits_root):
    """The ten-line training script, then the feature script, from docs/API.md, in a fresh folder laid out as the
    repository (configs/, demo_data/)."""
    train, feats = _doc_scripts()
    assert len([ln for ln in train.strip().splitlines() if ln.strip()]) <= 10
    os.symlink(ROOT / "configs", tmp_path / "configs")
    os.symlink(digits_root, tmp_path / "demo_data")
    env = subprocess_env()
    out = subprocess.run([sys.executable, "-c", train], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stopped at step 12 with loss" in out.stdout
    assert (tmp_path / "runs" / "api" / "checkpoints" / "step_00000012" / "meta.json").exists()
    out = subprocess.run([sys.executable, "-c", feats], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # vit_tiny_cpu: patch 8, width 64 -> a 32-px image gives 16 patch tokens of 64 channels
    assert "CLS (1, 64) patches (1, 16, 64)" in out.stdout, out.stdout


def test_load_backbone_teacher_student_export_and_file_agree(tmp_path):
    """From the run folder kept from before the package re-layout: the teacher's timm ViT equals the one its
    export loads, and the student differs from the teacher; both equal the network's own backbone features."""
    from sere_scale.export.timm_dir import export_timm
    from sere_scale.models.load import load_teacher
    run = tmp_path / "run"
    import shutil
    shutil.copytree(Path(__file__).parent / "fixtures" / "run_before_layout", run)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vit_t = sere_scale.load_backbone(run)
    vit_s = sere_scale.load_backbone(run, weights="student")
    _, net = load_teacher(run)
    with torch.no_grad():
        ref = net.backbone(x)["patch"]
        ft = vit_t.forward_features(x)[:, vit_t.num_prefix_tokens:]
        fs = vit_s.forward_features(x)[:, vit_s.num_prefix_tokens:]
    torch.testing.assert_close(ft, ref, rtol=0, atol=1e-6)
    assert fs.shape == ft.shape
    # each holds its own weights: the checkpoint's raw state dicts (DDP model.pt: "student", "teacher")
    raw = torch.load(run / "checkpoints" / "step_00000004" / "model.pt", map_location="cpu", weights_only=True)
    for vit, key in ((vit_t, "teacher"), (vit_s, "student")):
        own = {k[len("backbone.vit."):]: v for k, v in raw[key].items() if k.startswith("backbone.vit.")}
        got = vit.state_dict()
        assert set(own) == set(got)
        for k in own:
            assert torch.equal(own[k], got[k]), (key, k)
    assert any(not torch.equal(raw["student"][k], raw["teacher"][k]) for k in raw["student"])
    export_timm(run, tmp_path / "timm_out")
    export_timm(run, tmp_path / "teacher.safetensors")
    vit_e = sere_scale.load_backbone(tmp_path / "timm_out")
    vit_f = sere_scale.load_backbone(tmp_path / "teacher.safetensors", arch="vit_tiny_cpu")
    with torch.no_grad():
        fe = vit_e.forward_features(x)[:, vit_e.num_prefix_tokens:]
        ff = vit_f.forward_features(x)[:, vit_f.num_prefix_tokens:]
    torch.testing.assert_close(fe, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ff, ref, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="arch"):
        sere_scale.load_backbone(tmp_path / "teacher.safetensors")


def test_cli_version_of_the_package_matches():
    assert re.fullmatch(r"\d+\.\d+\.\d+", sere_scale.__version__)
