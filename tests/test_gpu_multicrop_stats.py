"""GPUMultiCrop's augmentation statistics against the CPU MultiCrop and METHOD.md's recipe, and its photometric
pipeline against per-image torchvision operations applied with the drawn parameters."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from sere_scale.data import gpu_ops
from sere_scale.data.gpu_multicrop import GPUMultiCrop
from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop

N = 500
COLOUR = (200, 40, 90)


def ks(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b)).max())


def png(im):
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def unnormalise(t):
    return (t * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) * 255


def geometry(boxes, flips, W, H):
    w, h = (boxes[..., 2] - boxes[..., 0]) * W, (boxes[..., 3] - boxes[..., 1]) * H
    area = w * h / (W * H)
    return {"area_global": area[:, :2], "area_local": area[:, 2:], "log_aspect": torch.log(w / h),
            "centre_x": (boxes[..., 0] + boxes[..., 2]) / 2, "centre_y": (boxes[..., 1] + boxes[..., 3]) / 2,
            "flip": flips.float()}


@pytest.fixture(scope="module")
def both():
    """N draws of 2 global + 2 local views of one constant-colour 64×48 image from each implementation."""
    img = Image.new("RGB", (64, 48), COLOUR)
    random.seed(0)
    torch.manual_seed(0)
    mc = MultiCrop(8, 8, 2, 2, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), photometric=True)
    cpu = [mc(img) for _ in range(N)]
    gpu = GPUMultiCrop(8, 8, 2, 2, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))(
        [png(img)] * N, torch.Generator().manual_seed(0), return_params=True)
    c = {"boxes": torch.stack([o["boxes"] for o in cpu]), "flips": torch.stack([o["flips"] for o in cpu]),
         "px": torch.stack([unnormalise(torch.stack([o["crops"][v] for o in cpu]))[:, :, 4, 4] for v in range(4)], 1)}
    g = {"boxes": gpu["boxes"], "flips": gpu["flips"], "params": gpu["params"],
         "px": torch.stack([unnormalise(gpu["crops"][v])[:, :, 4, 4] for v in range(4)], 1)}
    return c, g


def test_crop_geometry_distributions_match_cpu(both):
    c, g = both
    gc, gg = geometry(c["boxes"], c["flips"], 64, 48), geometry(g["boxes"], g["flips"], 64, 48)
    for k in gc:
        assert ks(gc[k].flatten(), gg[k].flatten()) < 0.1, k  # critical value at p=1e-3 and n=1000: ~0.09
    for d in (gc, gg):
        assert 0.38 <= d["area_global"].min() and d["area_global"].max() <= 1.0
        assert 0.04 <= d["area_local"].min() and d["area_local"].max() <= 0.42
        assert d["log_aspect"].abs().max() <= np.log(4 / 3) + 0.1  # rounding to whole pixels
        assert 0.44 < d["flip"].mean() < 0.56
    assert ks(gg["area_global"].flatten(), gg["area_local"].flatten()) > 0.9  # the statistic discriminates


def test_colour_distributions_and_jitter_grey_rates_match_cpu(both):
    c, g = both
    orig = torch.tensor(COLOUR, dtype=torch.float32).view(1, 1, 3)
    no_sol = [0, 2, 3]  # view 1 may be solarized (p=0.2): compared on its own
    for v in (no_sol, [1]):
        for ch in range(3):
            assert ks(c["px"][:, v, ch].flatten(), g["px"][:, v, ch].flatten()) < 0.1, (v, ch)
    rates = {}
    for name, d in (("cpu", c), ("gpu", g)):
        px = d["px"][:, no_sol]
        unchanged = ((px - orig).abs().amax(-1) < 1.5).float().mean().item()  # no jitter and no grayscale
        grey = ((px - px[..., :1]).abs().amax(-1) < 1.5).float().mean().item()
        rates[name] = (unchanged, grey)
        assert abs(unchanged - 0.2 * 0.8) < 0.04 and abs(grey - 0.2) < 0.04, (name, unchanged, grey)
    assert all(abs(a - b) < 0.05 for a, b in zip(rates["cpu"], rates["gpu"])), rates


def test_drawn_parameters_follow_the_recipe(both):
    p = both[1]["params"]
    def rate(t):
        return t.float().mean(0)
    tol = 4 * np.sqrt(0.25 / N)
    assert torch.allclose(rate(p["jitter"]), torch.full((4,), 0.8), atol=tol)
    assert torch.allclose(rate(p["gray"]), torch.full((4,), 0.2), atol=tol)
    assert torch.allclose(rate(p["blur"]), torch.tensor([1.0, 0.1, 0.5, 0.5]), atol=tol)
    assert torch.allclose(rate(p["solarize"]), torch.tensor([0.0, 0.2, 0.0, 0.0]), atol=tol)
    f = p["factors"].reshape(-1, 4)
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    assert (f >= lo).all() and (f <= hi).all()
    for j in range(4):  # uniform on [lo, hi]: KS against the exact CDF
        u = ((f[:, j] - lo[j]) / (hi[j] - lo[j])).sort().values.numpy()
        assert np.abs(u - (np.arange(len(u)) + 0.5) / len(u)).max() < 0.05
    s = p["sigma"].flatten()
    assert 0.1 <= s.min() and s.max() <= 2.0 and abs(s.mean().item() - 1.05) < 0.05
    first = p["order"][..., 0].flatten()  # each operation comes first a quarter of the time
    assert torch.allclose(torch.bincount(first, minlength=4).float() / len(first), torch.full((4,), 0.25), atol=0.04)
    assert (p["order"].sort(-1).values == torch.arange(4)).all()  # permutations


def test_photometric_pipeline_equals_per_image_reference():
    """Crops with photometric=True equal the photometric=False crops (same draws) put through torchvision's
    per-image operations with each view's own parameters, in its own order."""
    rng = np.random.default_rng(0)
    imgs = [png(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))) for h, w in ((40, 52), (36, 30))]
    kw = {"global_size": 24, "local_size": 12, "n_global": 2, "n_local": 2}
    on = GPUMultiCrop(**kw)(imgs * 8, torch.Generator().manual_seed(3), return_params=True)
    off = GPUMultiCrop(**kw, photometric=False)(imgs * 8, torch.Generator().manual_seed(3))
    p = on["params"]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    n_checked = 0
    for v in range(4):
        want_all = unnormalise(off["crops"][v]) / 255
        for b in range(16):
            x = want_all[b]
            if p["jitter"][b, v]:
                for op in p["order"][b, v].tolist():
                    x = ops[op](x, float(p["factors"][b, v, op]))
            if p["gray"][b, v]:
                x = TF.rgb_to_grayscale(x, 3)
            if p["blur"][b, v]:
                x = gpu_ops.gaussian_blur(x[None], p["sigma"][b, v:v + 1])[0]
            if p["solarize"][b, v]:
                x = TF.solarize(x, 128 / 255)
            got = unnormalise(on["crops"][v][b:b + 1])[0] / 255
            assert torch.allclose(got, x, atol=2e-3), (v, b, (got - x).abs().max())
            n_checked += bool(p["jitter"][b, v]) + bool(p["blur"][b, v])
    assert n_checked > 20
