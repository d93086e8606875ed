"""GPUMultiCrop (run on the CPU device): the box/flip contract on coordinate-encoding pixels, JPEG and PNG
(fallback) inputs of mixed sizes, padding invariance, determinism, dropped undecodable images."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sere_scale.data.gpu_multicrop import GPUMultiCrop, sample_crops
from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD, sample_crop

SIZES = [(256, 192), (160, 224), (200, 120)]  # (W, H): pixel values encode coordinates, so <= 256


def coord_image(W, H):
    """R = x pixel index, G = y pixel index, B = 0 (as tests/test_multicrop.py)."""
    x = np.tile(np.arange(W, dtype=np.uint8), (H, 1))
    y = np.tile(np.arange(H, dtype=np.uint8)[:, None], (1, W))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1), "RGB")


def encode(im, fmt):
    b = io.BytesIO()
    if fmt == "JPEG":  # quality 100 without chroma subsampling: the coordinates survive to ~0.2 levels
        im.save(b, fmt, quality=100, subsampling=0)
    else:
        im.save(b, fmt)
    return b.getvalue()


def unnormalise(t):
    return t * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def coord_errors(crop, box, flip, W, H, mirror_expectation=False):
    """Mean/max |pixel - expected coordinate| for x (R) and y (G) over the whole crop."""
    s = crop.shape[-1]
    px = unnormalise(crop).double() * 255
    x1, y1, x2, y2 = box.double().tolist()
    u = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    ux = 1 - u if bool(flip) != mirror_expectation else u
    ex = (x1 + ux * (x2 - x1)) * W - 0.5  # METHOD.md: view u → original x; pixel centre = pixel value
    ey = (y1 + u * (y2 - y1)) * H - 0.5
    ex_err = (px[0] - ex[None, :]).abs()
    ey_err = (px[1] - ey[:, None]).abs()
    return max(ex_err.mean(), ey_err.mean()).item(), max(ex_err.max(), ey_err.max()).item()


@pytest.fixture(scope="module")
def encoded():
    return {fmt: [encode(coord_image(W, H), fmt) for W, H in SIZES] for fmt in ("JPEG", "PNG")}


@pytest.mark.parametrize("fmt, tol_mean, tol_max", [("JPEG", 1.0, 4.0), ("PNG", 0.05, 0.5)])
@pytest.mark.parametrize("seed", range(3))
def test_crop_pixels_match_box_and_flip(encoded, fmt, tol_mean, tol_max, seed):
    mc = GPUMultiCrop(48, 24, n_global=2, n_local=3, global_scale=(0.3, 1), local_scale=(0.05, 0.4),
                      photometric=False, device="cpu")
    out = mc(encoded[fmt], torch.Generator().manual_seed(seed))
    assert [c.shape for c in out["crops"]] == [(3, 3, 48, 48)] * 2 + [(3, 3, 24, 24)] * 3
    assert out["boxes"].shape == (3, 5, 4) and out["flips"].shape == (3, 5) and out["flips"].dtype == torch.bool
    assert (mc.stats.device, mc.stats.fallback) == ((3, 0) if fmt == "JPEG" else (0, 3))
    for b, (W, H) in enumerate(SIZES):
        for v, crop in enumerate(out["crops"]):
            box, flip = out["boxes"][b, v], out["flips"][b, v]
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            mean, mx = coord_errors(crop[b], box, flip, W, H)
            assert mean < tol_mean and mx < tol_max, (fmt, b, v, box, flip, mean, mx)
            if flip:  # the test sees a wrong flip bookkeeping
                assert coord_errors(crop[b], box, flip, W, H, mirror_expectation=True)[0] > 5


def test_both_flips_and_fallback_sizes_occur(encoded):
    mc = GPUMultiCrop(16, 8, 2, 4, photometric=False)
    flips = torch.cat([mc(encoded["PNG"], torch.Generator().manual_seed(s))["flips"].flatten() for s in range(4)])
    assert 0.25 < flips.float().mean() < 0.75
    # a 4:1 image makes many local draws fail their tries: the fallback central crop clamps the ratio
    box = sample_crops(torch.tensor([[10, 400]]), torch.tensor([0.9]), torch.tensor([1.0]), torch.Generator())
    left, top, w, h = box[0, 0].tolist()
    assert (w, h, top, left) == (round(10 * 4 / 3), 10, 0, (400 - 13) // 2)
    assert (top, left, h, w) == sample_crop(400, 10, (0.9, 1.0))  # the CPU MultiCrop's fallback


def test_padding_groups_do_not_change_crops(encoded):
    """Images of different sizes are padded into one batch; one group per image must give the same crops."""
    kw = {"global_size": 32, "local_size": 16, "n_global": 2, "n_local": 2, "photometric": True}
    one = GPUMultiCrop(**kw)(encoded["PNG"], torch.Generator().manual_seed(5))
    solo = GPUMultiCrop(**kw, max_group_pixels=1)
    sep = solo(encoded["PNG"], torch.Generator().manual_seed(5))
    assert len(solo._groups([(192, 256), (224, 160), (120, 200)])) == 3
    for a, b in zip(one["crops"], sep["crops"]):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(one["boxes"], sep["boxes"])


def test_deterministic_per_generator_seed(encoded):
    mc = GPUMultiCrop(32, 16, 2, 2)
    a = mc(encoded["JPEG"], torch.Generator().manual_seed(1))
    b = mc(encoded["JPEG"], torch.Generator().manual_seed(1))
    c = mc(encoded["JPEG"], torch.Generator().manual_seed(2))
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"])) and torch.equal(a["boxes"], b["boxes"])
    assert not torch.equal(a["boxes"], c["boxes"])


def test_undecodable_images_are_dropped_and_counted(encoded):
    mc = GPUMultiCrop(16, 8, 2, 1)
    batch = [encoded["JPEG"][0], b"garbage" * 9, encoded["PNG"][1], b""]
    out = mc(batch, torch.Generator().manual_seed(0))
    assert out["kept"].tolist() == [0, 2] and mc.n_failed == 2 and mc.n_fallback == 1
    assert [c.shape[0] for c in out["crops"]] == [2, 2, 2] and out["boxes"].shape == (2, 3, 4)
    empty = mc([b"x"], torch.Generator())
    assert empty["kept"].numel() == 0 and [c.shape for c in empty["crops"]] == [(0, 3, 16, 16)] * 2 + [(0, 3, 8, 8)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_cuda_matches_cpu_device(encoded):
    """Same generator seed → same parameters on any device; crops agree up to decoder/arithmetics."""
    kw = {"global_size": 48, "local_size": 24, "n_global": 2, "n_local": 3}
    for fmt, tol in (("JPEG", 1.0), ("PNG", 0.02)):
        cpu = GPUMultiCrop(**kw, device="cpu")(encoded[fmt], torch.Generator().manual_seed(0))
        mc = GPUMultiCrop(**kw, device="cuda")
        gpu = mc(encoded[fmt], torch.Generator().manual_seed(0))
        assert mc.stats.device == (3 if fmt == "JPEG" else 0)
        assert torch.equal(cpu["boxes"], gpu["boxes"].cpu()) and torch.equal(cpu["flips"], gpu["flips"].cpu())
        for a, b in zip(cpu["crops"], gpu["crops"]):
            diff = (unnormalise(a) - unnormalise(b.cpu())).abs() * 255
            assert diff.mean() < tol, (fmt, diff.mean())
