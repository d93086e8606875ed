"""Invariance of self-relations between two views: 0 for identical views, growing with augmentation strength,
the same from a checkpoint and from its timm file, and logged during training without disturbing it."""
import json
import subprocess
import sys

import pytest
import torch

from sere_scale.eval.invariance import list_images, measure_invariance
from sere_scale.eval.views import ScaledViews, make_views
from sere_scale.run.metrics import read_metrics
from sere_scale.models.load import load_teacher
from sere_scale.run.train import train
from tests.conftest import digits_subset, subprocess_env
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, digits_root):
    """4 classes × 8 validation digits."""
    return digits_subset(digits_root, tmp_path_factory.mktemp("inv_small"), 4, 8, "val")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, small_data):
    run = tmp_path_factory.mktemp("inv_run") / "run"
    train(tiny_config(run, small_data, "train.max_steps=2"))
    return run


def test_strength_zero_gives_identical_views(small_data):
    from PIL import Image
    img = Image.open(list_images(small_data)[0]).convert("RGB")
    v = make_views(ScaledViews(32, 0.0), img, 0, 0)
    assert torch.equal(v["crops"][0], v["crops"][1]) and torch.equal(v["boxes"][0], v["boxes"][1])
    w = make_views(ScaledViews(32, 1.0), img, 0, 0)
    assert not torch.equal(w["crops"][0], w["crops"][1])


def test_identical_views_are_invariant_and_stronger_augmentation_less(tiny_run, small_data):
    cfg, net = load_teacher(tiny_run)
    images = list_images(small_data)
    res = {s: measure_invariance(net.backbone, images, cfg, s, batch_size=16) for s in (0.0, 0.5, 1.0)}
    assert res[0.0]["spatial"] == 0.0 and res[0.0]["channel"] == 0.0
    assert res[0.0]["spatial_unrelated"] > 0.05 and res[0.0]["channel_unrelated"] > 0.05  # not a blind 0
    for key in ("spatial", "channel"):
        assert res[0.0][key] < res[0.5][key] < res[1.0][key], (key, [res[s][key] for s in res])
    r = res[1.0]
    assert r["n_images"] == 32 and r["overlap_frac"] == 1.0 and len(r["spatial_per_head"]) == 4
    assert 0 < r["spatial_ratio"] < 1.5 and r["spatial_ratio"] == pytest.approx(
        r["spatial"] / r["spatial_unrelated"])
    # the result does not depend on how images are batched
    again = measure_invariance(net.backbone, images, cfg, 1.0, batch_size=5)
    for key in ("spatial", "channel", "spatial_unrelated", "channel_unrelated"):
        assert again[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7)


def test_cli_from_checkpoint_and_from_timm_file_agree(tiny_run, small_data, tmp_path, capsys):
    from safetensors.torch import save_file

    from sere_scale.cli import main
    _, net = load_teacher(tiny_run)
    weights = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in net.backbone.vit.state_dict().items()}, str(weights))
    common = ["--data", str(small_data), "--max-images", "12", "--strength", "0.7"]
    # the installed entry point, in a child process
    cmd = [sys.executable, "-m", "sere_scale", "invariance", "--checkpoint", str(tiny_run), *common, "--out",
           str(tmp_path / "ckpt.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    outs = {"ckpt": json.loads((tmp_path / "ckpt.json").read_text())}
    assert json.loads(p.stdout.strip().splitlines()[-1])["spatial"] == outs["ckpt"]["spatial"]
    for name, src in (("timm", ["--timm-file", str(weights), "--arch", "vit_tiny_cpu"]),
                      ("detected", ["--checkpoint", str(weights), "--timm-arch", "vit_tiny_cpu"])):
        assert main(["invariance", *src, "--relation-size", "3", *common]) == 0
        outs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outs["ckpt"]["n_images"] == 12 and outs["ckpt"]["size"] == 3 and outs["ckpt"]["image_size"] == 32
    for name in ("timm", "detected"):
        assert outs[name]["image_size"] == 32
        for key in ("spatial", "channel"):
            assert outs[name][key] == pytest.approx(outs["ckpt"][key], rel=1e-5)
    with pytest.raises(ValueError, match="--arch"):
        main(["invariance", "--checkpoint", str(weights), "--data", str(small_data)])


def test_training_logs_invariance_without_changing_the_run(tmp_path, small_data):
    extra = ["train.max_steps=3", "data.batch_size=4"]
    train(tiny_config(tmp_path / "plain", small_data, *extra))
    train(tiny_config(tmp_path / "inv", small_data, *extra, "eval.invariance_every=2",
                      "checkpoint.every_steps=2",
                      f"eval.invariance_data={small_data}", "eval.invariance_images=8"))
    plain, inv = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "inv")
    assert [("invariance_spatial" in r) for r in inv] == [False, True, False]
    r = inv[1]
    assert 0 < r["invariance_spatial"] < 1 and 0 < r["invariance_channel"] < 1
    assert r["invariance_spatial_ratio"] > 0
    for a, b in zip(plain, inv):  # the model's random streams are untouched
        for k in ("loss", "loss_spatial", "loss_channel", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-7)
    # it measures the teacher of that step: the same numbers as measuring the step-2 checkpoint
    cfg, net = load_teacher(tmp_path / "inv" / "checkpoints" / "step_00000002")
    ref = measure_invariance(net.backbone, list_images(small_data, 8), cfg, "train")
    assert ref["spatial"] == pytest.approx(r["invariance_spatial"], rel=1e-5)
    assert ref["channel"] == pytest.approx(r["invariance_channel"], rel=1e-5)
