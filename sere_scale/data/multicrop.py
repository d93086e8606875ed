"""CPU multi-crop with box/flip bookkeeping (the box contract of METHOD.md)."""
from __future__ import annotations

import random
from typing import Optional

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from sere_scale.data.pixels import to_rgb
from sere_scale.data.recipe import IMAGENET_MEAN, IMAGENET_STD, AugmentRecipe, sample_crop  # noqa: F401  (re-exported)


def _from_recipe(name: str) -> property:
    return property(lambda self: getattr(self.recipe, name), doc=f"``recipe.{name}``")


class RecipeViews:
    """What every multi-crop implementation reads off its :class:`AugmentRecipe` (``self.recipe``)."""

    recipe: AugmentRecipe
    global_size = _from_recipe("global_size")
    local_size = _from_recipe("local_size")
    n_global = _from_recipe("n_global")
    n_local = _from_recipe("n_local")
    photometric = _from_recipe("photometric")
    n_views = _from_recipe("n_views")

    def sizes(self) -> list[int]:
        return self.recipe.sizes()

    def view_probs(self, v: int) -> tuple[float, float]:
        return self.recipe.view_probs(v)


class MultiCrop(RecipeViews):
    """Global and local crops of one image, each with its box (normalised xyxy in the original) and flip.

    Called on a PIL image: ``{"crops": [V tensors (3,S,S)], "boxes": (V,4) float, "flips": (V,) bool}``, globals
    first. Randomness comes from Python's ``random`` (seed it per sample for reproducible data).
    """

    def __init__(self, *args, recipe: Optional[AugmentRecipe] = None, **fields):
        """``MultiCrop(recipe=r)``, or the recipe's fields (``global_size, local_size, n_global, n_local,
        global_scale, local_scale``, then keywords such as ``photometric``) with the others at their defaults."""
        self.recipe = recipe if recipe is not None else AugmentRecipe(*args, **fields)
        r = self.recipe
        self.jitter = T.ColorJitter(*r.jitter)
        self.mean, self.std = torch.tensor(r.mean).view(3, 1, 1), torch.tensor(r.std).view(3, 1, 1)

    def _colour(self, img: Image.Image) -> Image.Image:
        """Colour jitter with ``jitter_p``, then grayscale with ``gray_p`` (torchvision's PIL ops)."""
        if random.random() < self.recipe.jitter_p:
            img = self.jitter(img)
        if random.random() < self.recipe.gray_p:
            img = ImageOps.grayscale(img).convert("RGB")
        return img

    def _photometric(self, img: Image.Image, v: int) -> Image.Image:
        r = self.recipe
        blur_p, sol_p = r.view_probs(v)
        img = self._colour(img)
        if random.random() < blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*r.blur_sigma)))
        if random.random() < sol_p:
            img = ImageOps.solarize(img, r.solarize_threshold)
        return img

    def __call__(self, img: Image.Image) -> dict:
        if img.mode != "RGB":
            img = to_rgb(img)  # high bit depths scaled, not clipped
        W, H = img.size
        crops, boxes, flips = [], [], []
        r = self.recipe
        for v in range(r.n_views):
            size = r.size(v)
            top, left, h, w = sample_crop(W, H, r.scale(v), r.ratio)
            crop = TF.resized_crop(img, top, left, h, w, [size, size], T.InterpolationMode.BICUBIC)
            flip = random.random() < r.flip_p
            if flip:
                crop = ImageOps.mirror(crop)
            if self.photometric:
                crop = self._photometric(crop, v)
            x = TF.pil_to_tensor(crop).float().div_(255.0)
            crops.append((x - self.mean) / self.std)
            boxes.append([left / W, top / H, (left + w) / W, (top + h) / H])
            flips.append(flip)
        return {"crops": crops, "boxes": torch.tensor(boxes, dtype=torch.float32),
                "flips": torch.tensor(flips, dtype=torch.bool)}
