"""A run folder written by the code before the package re-layout (issue 22: every module moved) still
resumes, exports and evaluates. ``tests/fixtures/run_before_layout`` was made by that code (commit a5016a5,
``sere-scale train`` with tests/tiny.py's TINY overrides, ``model.depth=1``, 4 steps, DDP, one process)."""
import json
import pickletools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT, subprocess_env

FIXTURE = Path(__file__).parent / "fixtures" / "run_before_layout"
CKPT = FIXTURE / "checkpoints" / "step_00000004"


def _pickled_globals(f: Path) -> set:
    """Every module.name a pickle inside a torch zip file refers to (GLOBAL / STACK_GLOBAL operands)."""
    z = zipfile.ZipFile(f)
    data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            names.add(str(arg).replace(" ", "."))
    return names


def test_old_checkpoint_pickles_no_module_path_of_ours():
    """Why a move cannot break old checkpoints: they hold tensors and plain containers only."""
    for f in CKPT.glob("*.pt"):
        names = _pickled_globals(f)
        assert names and not any(n.startswith("sere_scale") for n in names), (f.name, names)


def _copy_run(tmp_path: Path, digits_root: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("/tmp/oldfix/run", str(run))
                                     .replace("/tmp/oldfix/digits/train", str(digits_root / "train")))
    return run


@pytest.mark.slow
def test_old_run_folder_resumes_exports_and_evaluates(tmp_path, digits_root):
    run = _copy_run(tmp_path, digits_root)
    env = subprocess_env()
    from tests.tiny import TINY
    over = [*TINY, "model.depth=1", f"output_dir={run}", f"data.path={digits_root / 'train'}",
            "train.max_steps=6", "checkpoint.every_steps=2"]
    out = subprocess.run([sys.executable, "-m", "sere_scale", "train", "--resume", *over], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((run / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["run_id"] == json.loads((CKPT / "meta.json").read_text())["run_id"]  # the same run, continued
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]

    out = subprocess.run([sys.executable, "-m", "sere_scale", "export", "--checkpoint", str(CKPT),
                          str(tmp_path / "exp")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "exp" / "model.safetensors").exists()

    from sere_scale.eval.knn import knn_accuracy
    from sere_scale.models.load import load_teacher
    cfg, net = load_teacher(CKPT)
    res = knn_accuracy(net.backbone, str(digits_root / "train"), str(digits_root / "val"), 32, 5, 0.07)
    assert 0.0 <= res["top1"] <= 100.0 and res["top1"] > 100 / 10 * 0.5  # evaluated (10 classes)
    w = torch.load(CKPT / "model.pt", map_location="cpu", weights_only=True)
    assert set(w) >= {"student", "teacher"}
