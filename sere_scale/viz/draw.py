"""PIL-only drawing: colour maps, overlays, boxes and titled panel grids.

A figure is a grid of square panels of ``panel`` pixels, each with a title strip of ``TITLE_H`` pixels above
it, separated and framed by ``PAD`` pixels: a grid of ``rows × cols`` panels is
``cols·(panel + PAD) + PAD`` wide and ``rows·(panel + TITLE_H + PAD) + PAD`` high.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

PAD = 4
TITLE_H = 14
BACKGROUND = (255, 255, 255)

# a perceptually ordered dark-blue → purple → orange → yellow map (inferno-like), linearly interpolated
_STOPS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                   [250, 193, 39], [252, 255, 164]], dtype=np.float64)


def grid_size(rows: int, cols: int, panel: int) -> tuple[int, int]:
    """(width, height) of a grid figure."""
    return cols * (panel + PAD) + PAD, rows * (panel + TITLE_H + PAD) + PAD


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) → uint8 RGB (..., 3)."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_STOPS) - 1)
    lo = np.floor(v).astype(int).clip(0, len(_STOPS) - 2)
    f = (v - lo)[..., None]
    return np.round(_STOPS[lo] * (1 - f) + _STOPS[lo + 1] * f).astype(np.uint8)


def tensor_to_pil(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Image.Image:
    """A normalised (3, H, W) image tensor → PIL RGB."""
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    arr = ((x.detach().float().cpu() * s + m).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def heat_image(values: np.ndarray, size: tuple[int, int], vmax: Optional[float] = None) -> Image.Image:
    """A (h, w) map scaled by ``vmax`` (default its max) → colour-mapped RGB image of ``size`` (nearest
    upsampling, one block per cell; box-filtered when shrinking)."""
    v = np.asarray(values, dtype=np.float64)
    vmax = float(v.max()) if vmax is None else float(vmax)
    rgb = colormap(v / vmax if vmax > 0 else np.zeros_like(v))
    im = Image.fromarray(rgb, mode="RGB")
    return im.resize(size, Image.NEAREST if im.size[0] <= size[0] else Image.BOX)


def overlay(img: Image.Image, values: np.ndarray, vmax: Optional[float] = None, alpha: float = 0.6,
            keep: Optional[np.ndarray] = None, dim: float = 0.3) -> Image.Image:
    """Blend a colour-mapped (h, w) map over ``img``; where ``keep`` (h, w) is False the image is dimmed to
    ``dim`` of its brightness and left uncoloured (DINO's thresholded display)."""
    heat = heat_image(values, img.size, vmax)
    out = Image.blend(img.convert("RGB"), heat, alpha)
    if keep is not None:
        k = Image.fromarray(np.asarray(keep, dtype=np.uint8) * 255, mode="L").resize(img.size, Image.NEAREST)
        dark = Image.eval(img.convert("RGB"), lambda p: int(p * dim))
        out = Image.composite(out, dark, k)
    return out


def draw_box(img: Image.Image, box: Sequence[float], color=(0, 255, 0), width: int = 2) -> Image.Image:
    """Draw a normalised (x1, y1, x2, y2) box on a copy of ``img``."""
    img = img.copy()
    W, H = img.size
    x1, y1, x2, y2 = box
    ImageDraw.Draw(img).rectangle([x1 * W, y1 * H, x2 * W - 1, y2 * H - 1], outline=color, width=width)
    return img


def draw_point(img: Image.Image, xy: Sequence[float], color=(0, 255, 255), radius: int = 4) -> Image.Image:
    """Mark a normalised (x, y) location with a ring on a copy of ``img``."""
    img = img.copy()
    W, H = img.size
    x, y = xy[0] * W, xy[1] * H
    ImageDraw.Draw(img).ellipse([x - radius, y - radius, x + radius, y + radius], outline=color, width=2)
    return img


def compose(panels: Sequence[Sequence[tuple[Image.Image, str]]], panel: int) -> Image.Image:
    """Lay out rows of (image, title) panels (each resized to ``panel``×``panel``) as described above; short
    rows are left blank on the right."""
    rows, cols = len(panels), max(len(r) for r in panels)
    fig = Image.new("RGB", grid_size(rows, cols, panel), BACKGROUND)
    draw = ImageDraw.Draw(fig)
    font = ImageFont.load_default()
    for r, row in enumerate(panels):
        for c, (im, title) in enumerate(row):
            x = PAD + c * (panel + PAD)
            y = PAD + r * (panel + TITLE_H + PAD)
            while title and draw.textlength(title, font=font) > panel - 2:  # clip to the panel's width
                title = title[:-1]
            draw.text((x + 1, y + 1), title, fill=(0, 0, 0), font=font)
            if im.size != (panel, panel):
                im = im.resize((panel, panel), Image.NEAREST if im.size[0] <= panel else Image.BOX)
            fig.paste(im.convert("RGB"), (x, y + TITLE_H))
    return fig
