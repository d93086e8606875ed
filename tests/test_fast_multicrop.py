"""FastMultiCrop keeps MultiCrop's contract (boxes in original coordinates, flip after crop), incl. reduced decode."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.transforms import functional as TF

from sere_scale.data.fastcrop import FastMultiCrop, apply_color_ops
from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop


def smooth_jpeg(w: int, h: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 6, 3)
    img = np.stack([127 + 110 * np.sin(x / (w / 5 + 13 * c) + y / (h / 4 + 7 * c) + a[c]) for c in range(3)], -1)
    b = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(b, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return b.getvalue()


def to_pixels(x: torch.Tensor) -> np.ndarray:
    m, s = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * s + m) * 255).permute(1, 2, 0).numpy()


def reference_crop(full: Image.Image, box, flip: bool, size: int) -> np.ndarray:
    """The view a box/flip pair describes, cut from the fully decoded original (independent of the crop code)."""
    W, H = full.size
    x1, y1, x2, y2 = (float(v) for v in box)
    ref = full.resize((size, size), Image.Resampling.BICUBIC, box=(x1 * W, y1 * H, x2 * W, y2 * H))
    if flip:
        ref = ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(ref, dtype=np.float32)


@pytest.mark.parametrize("w,h,gs,ls,tol", [(500, 375, 224, 96, 0.6), (1600, 1200, 64, 32, 4.0)])
def test_crops_show_their_boxes_in_original_coordinates(w, h, gs, ls, tol, monkeypatch):
    data = smooth_jpeg(w, h)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    scales = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        r = real_draft(self, mode, size)
        scales.append(self.size)
        return r

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    mc = FastMultiCrop(gs, ls, 2, 6, photometric=False)
    n_flipped = 0
    for seed in range(3):
        random.seed(seed)
        out = mc(Image.open(io.BytesIO(data)))
        assert len(out["crops"]) == 8 and out["boxes"].shape == (8, 4) and out["flips"].dtype == torch.bool
        assert [tuple(c.shape) for c in out["crops"]] == [(3, gs, gs)] * 2 + [(3, ls, ls)] * 6
        assert (out["boxes"] >= 0).all() and (out["boxes"] <= 1).all()
        n_flipped += int(out["flips"].sum())
        for v, size in enumerate([gs] * 2 + [ls] * 6):
            ref = reference_crop(full, out["boxes"][v], bool(out["flips"][v]), size)
            err = np.abs(to_pixels(out["crops"][v]) - ref).mean()
            assert err < tol, f"view {v}: mean error {err:.2f} levels"
            if out["flips"][v]:  # the flip is real: the unflipped reference is far off
                unflipped = reference_crop(full, out["boxes"][v], False, size)
                assert np.abs(to_pixels(out["crops"][v]) - unflipped).mean() > 3 * tol
    assert n_flipped > 0
    reduced = [s for s in scales if s[0] < w]
    assert bool(reduced) == (w > 1000), f"reduced decode used: {scales}"


def test_existing_multicrop_passes_the_same_reference():
    data = smooth_jpeg(500, 375, 1)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    random.seed(0)
    out = MultiCrop(224, 96, 2, 4, photometric=False)(full)
    for v, size in enumerate([224] * 2 + [96] * 4):
        err = np.abs(to_pixels(out["crops"][v]) - reference_crop(full, out["boxes"][v], bool(out["flips"][v]), size))
        assert err.mean() < 1.5


def test_loaded_gray_and_png_inputs():
    mc = FastMultiCrop(32, 16, 2, 2)
    g = Image.open(io.BytesIO(smooth_jpeg(80, 60))).convert("L")
    b = io.BytesIO()
    g.save(b, "JPEG")
    for img in (Image.open(io.BytesIO(smooth_jpeg(80, 60))).convert("RGB"), Image.open(b),
                Image.open(io.BytesIO(smooth_jpeg(80, 60, fmt="PNG")))):
        random.seed(1)
        out = mc(img)
        assert [tuple(c.shape) for c in out["crops"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
        assert all(torch.isfinite(c).all() for c in out["crops"])


def test_same_seed_same_views():
    data = smooth_jpeg(300, 200, 2)
    mc = FastMultiCrop(64, 32, 2, 3)
    outs = []
    for _ in range(2):
        random.seed(5)
        outs.append(mc(Image.open(io.BytesIO(data))))
    assert all(torch.equal(a, b) for a, b in zip(outs[0]["crops"], outs[1]["crops"]))
    assert torch.equal(outs[0]["boxes"], outs[1]["boxes"])


@pytest.fixture(scope="module")
def crop96():
    return Image.open(io.BytesIO(smooth_jpeg(96, 96, 3))).convert("RGB")


@pytest.mark.parametrize("op,f,ref_fn,tol", [
    ("brightness", 1.3, TF.adjust_brightness, 1.0), ("brightness", 0.7, TF.adjust_brightness, 1.0),
    ("contrast", 0.6, TF.adjust_contrast, 1.0), ("contrast", 1.3, TF.adjust_contrast, 1.0),
    ("saturation", 1.2, TF.adjust_saturation, 1.0), ("saturation", 0.8, TF.adjust_saturation, 1.0),
    ("gray", 1.0, lambda im, _: TF.to_grayscale(im, 3), 1.0),
    ("hue", 0.05, TF.adjust_hue, 2.5), ("hue", -0.08, TF.adjust_hue, 2.5), ("hue", 0.1, TF.adjust_hue, 2.5)])
def test_colour_ops_match_torchvision(crop96, op, f, ref_fn, tol):
    got = np.asarray(apply_color_ops(crop96, [(op, f)]), dtype=np.float32)
    ref = np.asarray(ref_fn(crop96, f), dtype=np.float32)
    assert np.abs(got - ref).mean() < tol
    if op == "hue":  # the shift is large compared with the error
        assert np.abs(ref - np.asarray(crop96, dtype=np.float32)).mean() > 4 * tol


@pytest.mark.parametrize("seq", [
    [("saturation", 1.15), ("brightness", 1.1), ("contrast", 0.8), ("hue", 0.07)],
    [("hue", -0.06), ("contrast", 1.2), ("brightness", 0.9), ("saturation", 0.85), ("gray", 1.0)],
    [("brightness", 1.2), ("hue", 0.03), ("saturation", 1.1), ("contrast", 0.7)]])
def test_jitter_sequence_matches_sequential_torchvision(crop96, seq):
    small = TF.adjust_contrast(crop96, 0.5)  # keeps values away from 0/255 so that no step clips
    ref = small
    fns = {"saturation": TF.adjust_saturation, "brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "hue": TF.adjust_hue, "gray": lambda im, _: TF.to_grayscale(im, 3)}
    for op, f in seq:
        ref = fns[op](ref, f)
    got = apply_color_ops(small, seq)
    assert np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32)).mean() < 2.0
