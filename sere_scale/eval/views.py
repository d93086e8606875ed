"""Two augmented views of one image, with their boxes and flips (the box contract of METHOD.md).

``strength="train"``: the run's own global-crop recipe (``MultiCrop`` with 2 global views, no locals: crop
scale ``data.global_scale``, flip, and — when ``data.photometric`` — colour jitter, grayscale, blur and
solarisation as in training).
``strength=s`` in [0, 1]: a one-knob recipe for measuring how relations change with augmentation strength:
RandomResizedCrop with scale (1 − 0.65 s, 1) and aspect ratio ((3/4)^s, (4/3)^s), flip with probability s/2,
colour jitter (0.4 s, 0.4 s, 0.2 s, 0.1 s). At s = 0 both views are the same centred square crop, unflipped
and unjittered: identical tensors.
"""
from __future__ import annotations

import random
from typing import Union

import torch
from PIL import Image, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..data.multicrop import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, sample_crop
from ..data.transform import sample_rng

Strength = Union[str, float]


def parse_strength(s: str | float) -> Strength:
    if isinstance(s, str) and s == "train":
        return s
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"augmentation strength must be 'train' or a number in [0, 1], got {s!r}")
    return v


class ScaledViews:
    """The one-knob recipe described in the module docstring; randomness from Python's and torch's RNG."""

    def __init__(self, size: int, strength: float):
        self.size, self.s = size, float(strength)
        s = self.s
        self.scale = (1.0 - 0.65 * s, 1.0)
        self.ratio = ((3 / 4) ** s, (4 / 3) ** s)
        self.jitter = T.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s) if s > 0 else None
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> dict:
        W, H = img.size
        crops, boxes, flips = [], [], []
        for _ in range(2):
            top, left, h, w = sample_crop(W, H, self.scale, self.ratio)
            crop = TF.resized_crop(img, top, left, h, w, [self.size, self.size], T.InterpolationMode.BICUBIC)
            flip = random.random() < self.s / 2
            if flip:
                crop = ImageOps.mirror(crop)
            if self.jitter is not None:
                crop = self.jitter(crop)
            x = TF.pil_to_tensor(crop).float().div_(255.0)
            crops.append((x - self.mean) / self.std)
            boxes.append([left / W, top / H, (left + w) / W, (top + h) / H])
            flips.append(flip)
        return {"crops": crops, "boxes": torch.tensor(boxes, dtype=torch.float32),
                "flips": torch.tensor(flips, dtype=torch.bool)}


def view_maker(cfg, size: int, strength: Strength):
    """A callable PIL image → {"crops": [2 × (3, size, size)], "boxes": (2, 4), "flips": (2,)}."""
    if strength == "train":
        d = cfg.data
        return MultiCrop(size, size, n_global=2, n_local=0, global_scale=d.global_scale,
                         local_scale=d.local_scale, photometric=d.photometric)
    return ScaledViews(size, float(strength))


def make_views(maker, img: Image.Image, seed: int, index: int) -> dict:
    """``maker(img)`` under a seed that depends only on (seed, index): the same image gets the same views in
    every call, whatever else used the random streams (which are restored afterwards)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    with sample_rng(seed, 0, index):
        return maker(img)


def overlapping_views(maker, img: Image.Image, seed: int, index: int, max_tries: int = 50) -> dict:
    """The first overlapping view pair of ``make_views(maker, img, seed + k, index)``, k = 0, 1, … (k = 0 is
    the pair ``measure_invariance`` uses for the image at ``index``)."""
    from ..geometry import overlap_boxes
    for k in range(max_tries):
        v = make_views(maker, img, seed + k, index)
        if bool(overlap_boxes(v["boxes"][0], v["boxes"][1])[1]):
            return v
    raise ValueError(f"no overlapping pair of views in {max_tries} draws")
