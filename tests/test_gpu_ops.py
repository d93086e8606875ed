"""Batched photometric ops (one parameter per image) against torchvision's per-image functions and PIL's blur."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF

from sere_scale.data import gpu_ops as G


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 12, 10, generator=g)
    x[0] = 0.5  # uniform grey
    x[1, :, :4] = x[1, :1, :4]  # grey rows
    x[2] = (torch.rand(3, 1, 1, generator=g) > 0.5).float().expand(3, 12, 10)  # saturated primaries
    x[3, 0] = x[3, 1]  # r == g ties
    return x


@pytest.mark.parametrize("ours, ref, lo, hi", [
    (G.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (G.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (G.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (G.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_jitter_ops_match_torchvision_per_image(images, ours, ref, lo, hi):
    f = torch.linspace(lo, hi, len(images))
    got = ours(images.clone(), f)
    want = torch.stack([ref(images[i], float(f[i])) for i in range(len(images))])
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(got, images, atol=1e-3)  # the factors do something


def test_hsv_round_trip_and_grey_fixed(images):
    assert torch.allclose(G.hsv_to_rgb(G.rgb_to_hsv(images)), images, atol=1e-5)
    grey = images[:1]  # uniform 0.5
    assert torch.allclose(G.adjust_hue(grey, torch.tensor([0.3])), grey, atol=1e-6)


def test_grayscale_and_solarize(images):
    # PIL's "L" (the CPU path): 299/587/114 per mille, rounded to 8 bits; torchvision uses 0.2989
    u8 = (images[4:] * 255).round().to(torch.uint8)
    pil_l = torch.stack([torch.from_numpy(np.array(TF.to_pil_image(im).convert("L"))) for im in u8]).float()
    assert (G.grayscale(u8.float() / 255)[:, 0] * 255 - pil_l).abs().max() <= 0.51
    assert torch.allclose(G.grayscale(images).expand(-1, 3, -1, -1),
                          torch.stack([TF.rgb_to_grayscale(im, 3) for im in images]), atol=1e-3)
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, 2)  # (1, 256, 3)
    pil = np.asarray(TF.solarize(Image.fromarray(levels, "RGB"), 128)).astype(np.float32)
    ours = G.solarize(torch.from_numpy(levels).permute(2, 0, 1)[None].float() / 255)[0].permute(1, 2, 0) * 255
    assert np.abs(ours.numpy() - pil).max() < 1e-3
    assert (pil[0, 200] == 55).all() and (pil[0, 100] == 100).all()


@pytest.mark.parametrize("sigma", [0.1, 0.3, 1.0, 2.0])
def test_blur_matches_pil_gaussian_blur(sigma):
    rng = np.random.default_rng(1)
    arr = np.zeros((40, 36, 3), np.uint8)
    arr[10:30, 8:20] = (220, 30, 120)  # edges in both directions, some touching nothing, noise everywhere
    arr[:, -3:] = 255  # a bright border column: edge handling
    arr = np.clip(arr.astype(int) + rng.integers(0, 30, arr.shape), 0, 255).astype(np.uint8)
    pil = np.asarray(Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float64)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255
    ours = G.gaussian_blur(x, torch.tensor([sigma]))[0].permute(1, 2, 0).double().numpy() * 255
    err = np.abs(ours - pil)
    # PIL rounds to 8 bits after each pass and treats the last columns slightly differently
    assert err.mean() < 1.0 and err[2:-2, 2:-2].max() < 3.0 and err.max() < 7, (err.mean(), err.max())
    if sigma >= 1.0:
        assert np.abs(ours - arr).mean() > 4 * err.mean()  # the blur is not a no-op


def test_blur_kernels_sum_to_one_with_variance_sigma_squared():
    sig = torch.tensor([0.1, 0.5, 0.77, 1.3, 2.0])
    R = G.kernel_radius(2.0)
    k = G.gaussian_kernels(sig, R).double()
    t = torch.arange(-R, R + 1).double()
    assert torch.allclose(k.sum(1), torch.ones(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose((k * t).sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    assert torch.allclose((k * t ** 2).sum(1), sig.double() ** 2, rtol=1e-4)
    assert (k[-1, :1] > 0).all()  # sigma 2 uses the full width: the radius is not too large


def test_blur_per_image_sigmas_in_one_call():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sig = torch.tensor([0.1, 0.9, 2.0])
    both = G.gaussian_blur(x, sig)
    for i in range(3):
        assert torch.allclose(both[i], G.gaussian_blur(x[i:i + 1], sig[i:i + 1])[0], atol=1e-6)
    assert not torch.allclose(both[1], both[2], atol=1e-2)
