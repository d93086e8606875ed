import random

import numpy as np
import pytest
import torch
from PIL import Image

from sere_scale.data.masking import MaskGenerator, block_mask
from sere_scale.data.fastcrop import FastMultiCrop
from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop

W, H = 256, 192


def coord_image():
    """R channel = x pixel index, G channel = y pixel index: pixel values encode their coordinates."""
    x = np.tile(np.arange(W, dtype=np.uint8), (H, 1))
    y = np.tile(np.arange(H, dtype=np.uint8)[:, None], (1, W))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1), "RGB")


def unnormalise(t):
    return t * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_shapes_order_and_types():
    random.seed(0)
    mc = MultiCrop(64, 32, n_global=3, n_local=4, global_scale=(0.4, 1), local_scale=(0.05, 0.4))
    out = mc(coord_image())
    assert [c.shape for c in out["crops"]] == [(3, 64, 64)] * 3 + [(3, 32, 32)] * 4
    assert out["boxes"].shape == (7, 4) and out["boxes"].dtype == torch.float32
    assert out["flips"].shape == (7,) and out["flips"].dtype == torch.bool
    b = out["boxes"]
    assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all() and (b >= 0).all() and (b <= 1).all()


@pytest.mark.parametrize("cls", [MultiCrop, FastMultiCrop])
@pytest.mark.parametrize("seed", range(6))
def test_crop_pixels_match_box_and_flip(seed, cls):
    random.seed(seed)
    torch.manual_seed(seed)
    S = 48
    mc = cls(S, 24, n_global=2, n_local=2, global_scale=(0.3, 1), local_scale=(0.1, 0.4), photometric=False)
    out = mc(coord_image())
    for crop, box, flip in zip(out["crops"], out["boxes"], out["flips"]):
        s = crop.shape[-1]
        px = unnormalise(crop) * 255
        x1, y1, x2, y2 = box.double().tolist()
        u = (torch.arange(s, dtype=torch.float64) + 0.5) / s
        if flip:
            u = 1 - u
        exp_x = (x1 + u * (x2 - x1)) * W - 0.5  # pixel centre coordinate = pixel value
        exp_y = (y1 + (torch.arange(s, dtype=torch.float64) + 0.5) / s * (y2 - y1)) * H - 0.5
        inner = slice(2, s - 2)  # bicubic resampling is exact on a ramp away from the border
        err_x = (px[0].double() - exp_x[None, :])[inner, inner].abs()
        err_y = (px[1].double() - exp_y[:, None])[inner, inner].abs()
        assert err_x.mean() < 1.0 and err_y.mean() < 1.0, (box, flip, err_x.mean(), err_y.mean())


def test_photometric_off_is_identity_on_colours_and_on_changes_them():
    img = Image.fromarray(np.full((64, 64, 3), (200, 40, 90), np.uint8))
    random.seed(1)
    plain = MultiCrop(32, 16, 2, 0, photometric=False)(img)["crops"][0]
    assert torch.allclose(unnormalise(plain)[:, 5, 5] * 255, torch.tensor([200.0, 40.0, 90.0]), atol=1.0)
    changed = 0
    for s in range(20):
        random.seed(s)
        torch.manual_seed(s)
        c = MultiCrop(32, 16, 2, 0, photometric=True)(img)["crops"][0]
        changed += not torch.allclose(c, plain, atol=1e-3)
    assert changed >= 10  # jitter (p=0.8) / grayscale alter most draws


def test_flip_rate_and_scale_distribution():
    random.seed(0)
    mc = MultiCrop(32, 16, 2, 2, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), photometric=False)
    img = Image.new("RGB", (200, 200))
    flips, g_area, l_area = [], [], []
    for _ in range(300):
        o = mc(img)
        flips += o["flips"].tolist()
        a = (o["boxes"][:, 2] - o["boxes"][:, 0]) * (o["boxes"][:, 3] - o["boxes"][:, 1])
        g_area += a[:2].tolist()
        l_area += a[2:].tolist()
    assert 0.44 < np.mean(flips) < 0.56
    assert 0.38 <= min(g_area) and max(g_area) <= 1.0 + 1e-6
    assert 0.04 <= min(l_area) and max(l_area) <= 0.42


def test_block_mask_hits_its_target_and_stays_in_bounds():
    rng = random.Random(0)
    for target in (5, 20, 50, 90):
        m = block_mask(14, 14, target, rng=rng)
        assert m.shape == (14, 14) and m.dtype == torch.bool
        assert 0.7 * target <= int(m.sum()) <= target, (target, int(m.sum()))


def test_mask_generator_probability_and_ratio():
    random.seed(0)
    gen = MaskGenerator(prob=0.5, ratio=(0.1, 0.5))
    ratios = [gen(14, 14).float().mean().item() for _ in range(400)]
    zero = np.mean([r == 0 for r in ratios])
    assert 0.4 < zero < 0.6
    nz = [r for r in ratios if r > 0]
    assert min(nz) >= 0.05 and max(nz) <= 0.52
    assert MaskGenerator(prob=0.0)(14, 14).sum() == 0
