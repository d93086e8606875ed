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

from typing import Union

from PIL import Image

from sere_scale.data.multicrop import MultiCrop
from sere_scale.data.pixels import to_rgb
from sere_scale.data.recipe import AugmentRecipe
from sere_scale.data.transform import sample_rng

Strength = Union[str, float]


def parse_strength(s: str | float) -> Strength:
    if isinstance(s, str) and s == "train":
        return s
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"augmentation strength must be 'train' or a number in [0, 1], got {s!r}")
    return v


class ScaledViews(MultiCrop):
    """The one-knob recipe described in the module docstring: ``MultiCrop`` with 2 global views of the recipe
    ``scaled_recipe(size, strength)`` whose photometric step is the colour jitter alone, on every view (no
    grayscale, blur or solarisation, and no draw for their probabilities)."""

    def __init__(self, size: int, strength: float):
        self.s = float(strength)
        super().__init__(recipe=scaled_recipe(size, self.s))

    def _photometric(self, img: Image.Image, v: int) -> Image.Image:
        return self.jitter(img)


def scaled_recipe(size: int, s: float) -> AugmentRecipe:
    return AugmentRecipe(size, size, n_global=2, n_local=0, global_scale=(1.0 - 0.65 * s, 1.0),
                         ratio=((3 / 4) ** s, (4 / 3) ** s), flip_p=s / 2, photometric=s > 0,
                         jitter=(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s))


def view_maker(cfg, size: int, strength: Strength):
    """A callable PIL image → {"crops": [2 × (3, size, size)], "boxes": (2, 4), "flips": (2,)}."""
    if strength == "train":
        return MultiCrop(recipe=AugmentRecipe.from_config(cfg, global_size=size, local_size=size, n_global=2,
                                                          n_local=0))
    return ScaledViews(size, float(strength))


def make_views(maker, img: Image.Image, seed: int, index: int) -> dict:
    """``maker(img)`` under a seed that depends only on (seed, index): the same image gets the same views in
    every call, whatever else used the random streams (which are restored afterwards)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    with sample_rng(seed, 0, index):
        return maker(img)


def overlapping_views(maker, img: Image.Image, seed: int, index: int, max_tries: int = 50) -> dict:
    """The first overlapping view pair of ``make_views(maker, img, seed + k, index)``, k = 0, 1, … (k = 0 is
    the pair ``measure_invariance`` uses for the image at ``index``)."""
    from sere_scale.geometry.boxes import overlap_boxes
    for k in range(max_tries):
        v = make_views(maker, img, seed + k, index)
        if bool(overlap_boxes(v["boxes"][0], v["boxes"][1])[1]):
            return v
    raise ValueError(f"no overlapping pair of views in {max_tries} draws")
