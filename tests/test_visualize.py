"""``sere-scale visualize``: three PNGs per image with the documented sizes, from a checkpoint and from a timm
file, and the same numbers from both."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from sere_scale.models.load import load_teacher
from sere_scale.run.train import train
from sere_scale.viz.draw import PAD, TITLE_H, grid_size
from tests.conftest import digits_subset, subprocess_env
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory, digits_root):
    root = tmp_path_factory.mktemp("vis")
    data = digits_subset(digits_root, root / "data", 2, 8)
    train(tiny_config(root / "run", data, "train.max_steps=1"))
    images = [sorted((data / c).iterdir())[0] for c in sorted(p.name for p in data.iterdir())]
    rgb = root / "photo.jpg"  # a non-square RGB image as well
    Image.effect_mandelbrot((60, 40), (-2, -1, 1, 1), 50).convert("RGB").save(rgb)
    return root / "run", [*images, rgb]


def test_grid_size_formula():
    assert grid_size(1, 1, 10) == (10 + 2 * PAD, 10 + TITLE_H + 2 * PAD)
    assert grid_size(2, 3, 50) == (3 * 54 + 4, 2 * (50 + TITLE_H + 4) + 4)


def test_visualize_writes_pictures_of_expected_sizes(run_and_images, tmp_path):
    run, images = run_and_images
    out = tmp_path / "pics"
    panel, points = 48, ["0.5,0.5", "0.1,0.9"]
    cmd = [sys.executable, "-m", "sere_scale", "visualize", "--checkpoint", str(run), "--images",
           *map(str, images), "--out", str(out), "--panel", str(panel), "--points", *points]
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    index = json.loads((out / "index.json").read_text())
    assert len(index["images"]) == len(images) == 3
    heads = 4  # vit_tiny_cpu
    expected = {"attention": (panel * (heads + 2) + PAD * (heads + 3), panel + TITLE_H + 2 * PAD),
                "relations": (5 * panel + 6 * PAD, (1 + len(points)) * (panel + TITLE_H + PAD) + PAD),
                "channels": (3 * panel + 4 * PAD, panel + TITLE_H + 2 * PAD)}
    for rec in index["images"]:
        for kind, size in expected.items():
            f = out / rec["files"][kind]
            with Image.open(f) as im:
                assert im.format == "PNG" and im.mode == "RGB" and im.size == size, (f, im.size, size)
        rel = rec["relations"]
        assert len(rel["points"]) == 2 and rel["relation_size"] == 4  # 32 px / patch 8
        assert 0 <= rel["spatial_tv"] <= 1 and 0 <= rel["channel_tv"] <= 1
        x1, y1, x2, y2 = rel["region"]
        assert x2 > x1 and y2 > y1
        assert rec["attention"]["grid"] == [4, 4] and len(rec["attention"]["kept_patches"]) == heads


def test_visualize_from_timm_file_matches_checkpoint(run_and_images, tmp_path):
    from safetensors.torch import save_file

    from sere_scale.cli import main
    run, images = run_and_images
    _, net = load_teacher(run)
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in net.backbone.vit.state_dict().items()}, str(weights))
    idx = {}
    for name, src in (("ckpt", ["--checkpoint", str(run)]),
                      ("timm", ["--timm-file", str(weights), "--arch", "vit_tiny_cpu"])):
        out = tmp_path / name
        assert main(["visualize", *src, "--images", str(images[0]), "--out", str(out), "--panel", "32"]) == 0
        idx[name] = json.loads((out / "index.json").read_text())["images"][0]
        assert (out / idx[name]["files"]["attention"]).exists()
    a, b = idx["ckpt"], idx["timm"]
    assert a["attention"] == b["attention"]
    assert a["relations"]["boxes"] == b["relations"]["boxes"]
    assert a["relations"]["spatial_tv"] == pytest.approx(b["relations"]["spatial_tv"], rel=1e-5)
