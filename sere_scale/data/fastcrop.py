"""A faster multi-crop with MultiCrop's constructor and output contract (for the shard loader).

Same crops, boxes and flips contract as :class:`MultiCrop` (box = normalised xyxy in the ORIGINAL decoded image,
flip after crop; the same ``AugmentRecipe``: ``sample_crop`` scales and ratios, probabilities and strengths).
Faster because:

* one decode per image, at reduced size (JPEG DCT scaling via PIL ``draft``: 1/2, 1/4, 1/8) when every crop
  still has at least as many source pixels as output pixels at that size; crop boxes are mapped into the
  reduced image, boxes are reported in original coordinates;
* each crop is one antialiased bicubic resize of a view of the decoded image with torch's uint8 channels-last
  kernel (same result as PIL's crop + BICUBIC resize, within 0.1 grey level, several times faster); crops are
  whole decoded pixels, so with a reduced decode the reported box is that of the pixels actually used;
* colour jitter (brightness, contrast, saturation, hue in random order, torchvision's ranges) and the random
  grayscale: consecutive linear steps are fused into one 3×4 colour matrix (``Image.convert("RGB", matrix)``)
  and the hue shift is a cached 17³ colour lookup table (``ImageFilter.Color3DLUT``) of torchvision's HSV hue
  shift, quantised like torchvision's (1/255 turn); within ~1-2 grey levels of torchvision's PIL pipeline, but
  values are clipped only after each fused group instead of after every step. Contrast uses the mean grey level
  of the image as it is at that step, as torchvision does;
* work stays uint8 until one normalisation per crop size.

Takes a PIL image, preferably opened but not yet loaded (``lazy_decode``) so the reduced decode can apply.
"""
from __future__ import annotations

import functools
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from sere_scale.data.multicrop import MultiCrop, sample_crop
from sere_scale.data.pixels import to_rgb

LUMA = np.array([0.299, 0.587, 0.114])  # PIL's "L" weights, used by torchvision's contrast/saturation/gray
LUT_SIZE = 17


def _rgb_to_hsv(x: np.ndarray):
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    dd = np.where(d > 0, d, 1.0)
    rc, gc, bc = ((mx - x[..., i]) / dd for i in range(3))
    h = np.where(x[..., 0] == mx, bc - gc, np.where(x[..., 1] == mx, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(d > 0, (h / 6.0) % 1.0, 0.0)
    return h, np.where(mx > 0, d / np.maximum(mx, 1e-12), 0.0), mx


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.stack([np.choose(i, [v, q, p, p, t, v]), np.choose(i, [t, v, v, q, p, p]),
                     np.choose(i, [p, p, t, v, v, q])], -1)


def hue_shift(x: np.ndarray, turns: float) -> np.ndarray:
    """Shift the HSV hue of RGB values ``x`` (..., 3) by ``turns``."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + turns) % 1.0, s, v)


@functools.cache
def hue_lut(k: int) -> ImageFilter.Color3DLUT:
    """Colour table shifting hue by k/255 turn (torchvision: ``H += uint8(hue_factor * 255)`` in PIL's HSV)."""
    g = np.linspace(0, 255, LUT_SIZE)
    b, gg, r = np.meshgrid(g, g, g, indexing="ij")  # the table's first (fastest) axis is red
    rgb = np.stack([r, gg, b], -1).reshape(-1, 3)
    return ImageFilter.Color3DLUT(LUT_SIZE, np.clip(hue_shift(rgb, k / 255.0), 0, 255) / 255.0, channels=3)


def hue_steps(hue_factor: float) -> int:
    return int(hue_factor * 255)  # truncation, as numpy's uint8 cast in torchvision's adjust_hue


def linear_step(name: str, f: float, mean_grey: float) -> tuple[float, float, float]:
    """One linear jitter step as (a, b, c) of ``x → a·x + b·(luma·x)·1 + c·1`` (torchvision's PIL semantics
    without clipping). Every step has this form: brightness (f, 0, 0), contrast (f, 0, (1-f)·mean grey),
    saturation (f, 1-f, 0), grayscale (0, 1, 0); since luma sums to 1 the form is closed under composition."""
    if name == "brightness":
        return f, 0.0, 0.0
    if name == "contrast":
        return f, 0.0, (1.0 - f) * mean_grey
    if name == "saturation":
        return f, 1.0 - f, 0.0
    if name == "gray":
        return 0.0, 1.0, 0.0
    raise ValueError(f"not a linear step: {name}")


def compose(first: tuple[float, float, float], then: tuple[float, float, float]) -> tuple[float, float, float]:
    (a1, b1, c1), (a2, b2, c2) = first, then
    return a2 * a1, a2 * b1 + b2 * (a1 + b1), (a2 + b2) * c1 + c2


IDENTITY = (1.0, 0.0, 0.0)


def apply_linear(img: Image.Image, abc: tuple[float, float, float]) -> Image.Image:
    a, b, c = abc
    l0, l1, l2 = (float(v) for v in LUMA)
    return img.convert("RGB", (a + b * l0, b * l1, b * l2, c, b * l0, a + b * l1, b * l2, c,
                               b * l0, b * l1, a + b * l2, c))


_LEVELS = np.arange(256, dtype=np.float64)


def mean_grey(img: Image.Image) -> float:
    """Mean of the image's "L" conversion (what torchvision's contrast blends towards)."""
    return float(_LEVELS @ np.asarray(img.convert("L").histogram(), dtype=np.float64)) / (img.width * img.height)


def apply_color_ops(img: Image.Image, ops: list[tuple[str, float]]) -> Image.Image:
    """Apply jitter steps in order: linear runs fused into one colour matrix each, hue through its lookup table."""
    abc, grey = IDENTITY, None  # pending linear map; mean grey of ``img`` as last materialised
    for name, f in ops:
        if name == "hue":
            k = hue_steps(f)
            if k == 0:
                continue
            if abc != IDENTITY:
                img, abc = apply_linear(img, abc), IDENTITY
            img, grey = img.filter(hue_lut(k)), None
            continue
        g = 0.0
        if name == "contrast":
            if grey is None:
                grey = mean_grey(img)
            g = (abc[0] + abc[1]) * grey + abc[2]  # mean grey of the image as it is at this step
        abc = compose(abc, linear_step(name, f, g))
    return apply_linear(img, abc) if abc != IDENTITY else img


class FastMultiCrop(MultiCrop):
    lazy_decode = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.photometric:  # build the hue tables now (~0.1 s); forkserver workers build their own once
            lo, hi = self.recipe.jitter_ranges()[3]
            for k in range(hue_steps(lo), hue_steps(hi) + 1):
                hue_lut(k)

    def reduction(self, W: int, H: int, views) -> int:
        """Largest JPEG scale-down (1, 2, 4, 8) that leaves every crop at least its output size."""
        r = min(min(w, h) / size for size, _, _, h, w, _ in views)
        return next((k for k in (8, 4, 2) if r >= k), 1)

    def _jitter_ops(self):
        r, ops = self.recipe, []
        if random.random() < r.jitter_p:
            (b0, b1), (c0, c1), (s0, s1), (h0, h1) = r.jitter_ranges()
            b, c, s = (random.uniform(b0, b1), random.uniform(c0, c1), random.uniform(s0, s1))
            h = random.uniform(h0, h1)
            for i in random.sample(range(4), 4):
                ops.append((("brightness", b), ("contrast", c), ("saturation", s), ("hue", h))[i])
        if random.random() < r.gray_p:
            ops.append(("gray", 1.0))
        return ops

    def _colour(self, img: Image.Image) -> Image.Image:
        """The same draws as ``MultiCrop._colour``, applied as fused colour matrices and a hue table."""
        ops = self._jitter_ops()
        return apply_color_ops(img, ops) if ops else img

    def __call__(self, img: Image.Image) -> dict:
        W, H = img.size
        views, r = [], self.recipe
        for v in range(r.n_views):
            top, left, h, w = sample_crop(W, H, r.scale(v), r.ratio)
            views.append((r.size(v), top, left, h, w, random.random() < r.flip_p))
        fx = fy = 1.0
        k = self.reduction(W, H, views) if getattr(img, "format", None) == "JPEG" else 1
        if k > 1:
            res = img.draft("RGB", (max(1, W // k), max(1, H // k)))  # None if already loaded
            if res is not None:
                fx, fy = res[1][2] / W, res[1][3] / H
        img = to_rgb(img) if img.mode != "RGB" else img  # high bit depths scaled, not clipped
        src = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]  # (1, 3, h, w) uint8, channels-last
        Wd, Hd = img.size
        crops, boxes, flips = [], [], []
        for v, (size, top, left, h, w, flip) in enumerate(views):
            # the crop in decoded pixels (whole pixels); its box is reported in original coordinates
            x1, y1 = min(round(left * fx), Wd - 1), min(round(top * fy), Hd - 1)
            x2, y2 = max(x1 + 1, min(round((left + w) * fx), Wd)), max(y1 + 1, min(round((top + h) * fy), Hd))
            # torch's antialiased bicubic on uint8 channels-last = PIL's crop + BICUBIC resize, several times faster
            crop = F.interpolate(src[..., y1:y2, x1:x2], size=(size, size), mode="bicubic", antialias=True)[0]
            crop = crop.permute(1, 2, 0).numpy()  # (S, S, 3) uint8
            if self.photometric:
                pil = Image.fromarray(crop)
                if flip:
                    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                crop = np.asarray(self._photometric(pil, v))
            elif flip:
                crop = crop[:, ::-1]
            crops.append(crop)
            boxes.append([x1 / fx / W, y1 / fy / H, min(1.0, x2 / fx / W), min(1.0, y2 / fy / H)])
            flips.append(flip)
        return {"crops": self._to_tensors(crops), "boxes": torch.tensor(boxes, dtype=torch.float32),
                "flips": torch.tensor(flips, dtype=torch.bool)}

    def _to_tensors(self, crops: list[np.ndarray]) -> list[torch.Tensor]:
        """uint8 (S, S, 3) crops → normalised float (3, S, S), one conversion per crop size."""
        out: list = [None] * len(crops)
        scale = (1.0 / (255.0 * self.std)).view(1, 3, 1, 1)
        shift = (self.mean / self.std).view(1, 3, 1, 1)
        for size in sorted({c.shape for c in crops}):
            idx = [i for i, c in enumerate(crops) if c.shape == size]
            u8 = torch.from_numpy(np.stack([crops[i] for i in idx]))  # (n, S, S, 3)
            x = torch.empty(len(idx), 3, *u8.shape[1:3])
            x.copy_(u8.permute(0, 3, 1, 2)).mul_(scale).sub_(shift)
            for i, t in zip(idx, x.unbind(0)):
                out[i] = t
        return out
