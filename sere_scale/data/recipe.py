"""The one augmentation recipe (docs/METHOD.md, "Augmentations (per view)"): every size, scale, probability and
strength the multi-crop implementations use, in one dataclass.

``MultiCrop`` (PIL), ``FastMultiCrop`` (uint8 torch resize + fused colour matrices), ``GPUMultiCrop`` (batched on
the device) and the evaluation views (``eval/views.py``) all read an :class:`AugmentRecipe`; the run's recipe is
``AugmentRecipe.from_config(cfg)`` (the crop geometry and ``photometric`` come from ``data.*``, the
probabilities and strengths are the paper's). ``sample_crop`` is the RandomResizedCrop draw the CPU paths share.
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Sequence

from sere_scale.config.load import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentRecipe:
    """Views are globals first (``n_global`` of ``global_size``², then ``n_local`` of ``local_size``²).

    Per view: RandomResizedCrop (bicubic; area fraction ``global_scale``/``local_scale``, aspect ratio ``ratio``)
    → horizontal flip with ``flip_p`` → when ``photometric``: colour jitter ``jitter`` = (brightness, contrast,
    saturation, hue) with ``jitter_p`` (the four in a random order) → grayscale with ``gray_p`` → Gaussian blur,
    sigma ~ U(``blur_sigma``), with ``blur_p`` → solarize (threshold ``solarize_threshold`` of 255) with
    ``solarize_p`` → normalisation by ``mean``/``std``. ``blur_p``/``solarize_p`` are per view kind: (first
    global, second global, local); further global views alternate between the two global recipes."""

    # the crop geometry: ``data.*`` keys, with their defaults
    global_size: int = DataConfig.global_size
    local_size: int = DataConfig.local_size
    n_global: int = DataConfig.n_global
    n_local: int = DataConfig.n_local
    global_scale: tuple[float, float] = DataConfig.global_scale
    local_scale: tuple[float, float] = DataConfig.local_scale
    photometric: bool = DataConfig.photometric
    # the paper's recipe (METHOD.md)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)
    solarize_threshold: int = 128

    def __post_init__(self):
        if self.n_global < 1 or self.n_local < 0:
            raise ValueError("multi-crop needs n_global >= 1 and n_local >= 0")
        for f in ("global_scale", "local_scale", "mean", "std", "ratio", "jitter", "blur_sigma", "blur_p",
                  "solarize_p"):
            object.__setattr__(self, f, tuple(float(v) for v in getattr(self, f)))

    @classmethod
    def from_config(cls, cfg, **overrides) -> "AugmentRecipe":
        """The run's recipe: ``data.{global,local}_size``, ``n_global``, ``n_local``, ``{global,local}_scale``,
        ``photometric``; ``overrides`` replace any field (e.g. the evaluation views' sizes)."""
        d = cfg.data
        r = cls(d.global_size, d.local_size, d.n_global, d.n_local, d.global_scale, d.local_scale,
                photometric=d.photometric)
        return dataclasses.replace(r, **overrides) if overrides else r

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local

    def is_global(self, v: int) -> bool:
        return v < self.n_global

    def sizes(self) -> list[int]:
        return [self.global_size] * self.n_global + [self.local_size] * self.n_local

    def size(self, v: int) -> int:
        return self.global_size if self.is_global(v) else self.local_size

    def scale(self, v: int) -> tuple[float, float]:
        return self.global_scale if self.is_global(v) else self.local_scale

    def view_probs(self, v: int) -> tuple[float, float]:
        """(blur probability, solarize probability) of view ``v``."""
        k = (0 if v % 2 == 0 else 1) if self.is_global(v) else 2
        return self.blur_p[k], self.solarize_p[k]

    def jitter_ranges(self) -> tuple[tuple[float, float], ...]:
        """The factor ranges of torchvision's ``ColorJitter(*jitter)``: brightness, contrast, saturation
        (1 ± strength), hue (± strength)."""
        b, c, s, h = self.jitter
        return (1 - b, 1 + b), (1 - c, 1 + c), (1 - s, 1 + s), (-h, h)


def sample_crop(width: int, height: int, scale: Sequence[float], ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (top, left, h, w): torchvision's ``RandomResizedCrop.get_params`` algorithm,
    drawn from Python's ``random`` (the stream every CPU augmentation of a sample shares; torchvision draws from
    torch's generator in float32, so its draws would differ)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(scale[0], scale[1])
        ar = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * ar)))
        h = int(round(math.sqrt(target / ar)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
