"""Batched photometric operations with one parameter per image, on float images in [0, 1] of shape (N, 3, H, W).

They follow torchvision's tensor definitions (``adjust_brightness`` ... ``adjust_hue``, ``rgb_to_grayscale``,
``solarize``) and PIL's ``GaussianBlur`` (radius = standard deviation, three box passes, edge pixels extended;
the CPU ``MultiCrop`` blurs with it), but take a
per-image factor tensor of shape (N,), so a whole batch of crops is processed in a few kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL "L" and torchvision's rgb_to_grayscale


def _col(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.dtype).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _col(f, x)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _col(f, x)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), f)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    c = v - x.min(1)[0]
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    # sector formula: h in units of 60 degrees; red max wins ties, then green
    h = torch.where(v == r, (g - b) / safe_c,
                    torch.where(v == g, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c))
    h = torch.where(c > 0, torch.remainder(h / 6, 1.0), torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    h, s, v = hsv.unbind(1)

    def chan(n: float) -> torch.Tensor:
        k = torch.remainder(n + h * 6, 6)
        return v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return torch.stack([chan(5), chan(3), chan(1)], 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``f`` turns (f in [-0.5, 0.5]); grey pixels are unchanged."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.to(x.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack([h, hsv[:, 1], hsv[:, 2]], 1)).clamp_(0, 1)


def solarize(x: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert values >= threshold (PIL's ``ImageOps.solarize(img, 128)`` on 8-bit levels)."""
    return torch.where(x >= threshold, 1 - x, x)


def pil_box_radius(sigma: torch.Tensor, passes: int = 3) -> torch.Tensor:
    """PIL's box radius l + a for a Gaussian of std ``sigma`` made of ``passes`` box blurs (Gwosdek et al. 2011,
    as in Pillow's BoxBlur.c): each box has variance sigma²/passes."""
    s2 = sigma.double() ** 2 / passes
    L = torch.sqrt(12 * s2 + 1)
    l = torch.floor((L - 1) / 2)  # noqa: E741  (PIL's name)
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    return l + a


def kernel_radius(max_sigma: float, passes: int = 3) -> int:
    """Half-width that holds the kernel of every sigma <= max_sigma."""
    return passes * (int(pil_box_radius(torch.tensor([max_sigma]), passes).floor().item()) + 1)


def gaussian_kernels(sigma: torch.Tensor, radius: int, passes: int = 3) -> torch.Tensor:
    """(N, 2·radius+1) 1-D kernels of PIL's ``GaussianBlur(sigma)``: ``passes`` extended box blurs (weight 1 on
    |i| <= l, a on |i| = l+1, normalised by 2(l+a)+1) convolved together; they sum to 1, variance sigma²."""
    r = pil_box_radius(sigma, passes)
    l, a = r.floor(), r - r.floor()  # noqa: E741
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=sigma.device).abs()
    box = torch.where(t[None] <= l[:, None], 1.0, torch.where(t[None] == l[:, None] + 1, a[:, None], 0.0))
    box = box / (2 * r[:, None] + 1)
    n = box.shape[0]
    k = box
    for _ in range(passes - 1):  # boxes are symmetric: correlation = convolution
        k = F.conv1d(k[None], box[:, None], padding=radius, groups=n)[0]
    return k.float()


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, max_sigma: float = 2.0) -> torch.Tensor:
    """PIL-equivalent Gaussian blur with a per-image sigma: two grouped convolutions for the whole batch.

    The kernels span ±kernel_radius(max_sigma) (6 px for sigma <= 2); borders extend the edge pixels, as PIL.
    """
    n, c, hgt, wid = x.shape
    radius = kernel_radius(max_sigma)
    k = gaussian_kernels(sigma.to(x.device), radius).to(x.dtype).repeat_interleave(c, 0)  # (N·C, K)
    y = x.reshape(1, n * c, hgt, wid)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    return y.view(n, c, hgt, wid)


# ColorJitter's four operations, indexed as torchvision numbers them (its random order is a permutation of these)
JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
