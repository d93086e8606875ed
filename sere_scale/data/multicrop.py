"""CPU multi-crop with box/flip bookkeeping (the box contract of METHOD.md)."""
from __future__ import annotations

import math
import random
from typing import Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sample_crop(width: int, height: int, scale: Sequence[float], ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (top, left, h, w), drawn from Python's ``random`` as torchvision does."""
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


class MultiCrop:
    """Global and local crops of one image, each with its box (normalised xyxy in the original) and flip.

    Called on a PIL image: ``{"crops": [V tensors (3,S,S)], "boxes": (V,4) float, "flips": (V,) bool}``, globals
    first. Randomness comes from Python's ``random`` (seed it per sample for reproducible data).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, n_global: int = 2, n_local: int = 10,
                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), photometric: bool = True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if n_global < 1 or n_local < 0:
            raise ValueError("MultiCrop needs n_global >= 1 and n_local >= 0")
        self.global_size, self.local_size = global_size, local_size
        self.n_global, self.n_local = n_global, n_local
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.photometric = photometric
        self.jitter = T.ColorJitter(0.4, 0.4, 0.2, 0.1)
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    # per-view photometric probabilities (METHOD.md): global 1 blur 1.0; global 2 blur 0.1 + solarize 0.2;
    # locals blur 0.5. Further global views alternate between the two global recipes.
    def view_probs(self, v: int) -> tuple[float, float]:
        if v < self.n_global:
            return (1.0, 0.0) if v % 2 == 0 else (0.1, 0.2)
        return 0.5, 0.0

    def _photometric(self, img: Image.Image, v: int) -> Image.Image:
        blur_p, sol_p = self.view_probs(v)
        if random.random() < 0.8:
            img = self.jitter(img)
        if random.random() < 0.2:
            img = ImageOps.grayscale(img).convert("RGB")
        if random.random() < blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        if random.random() < sol_p:
            img = ImageOps.solarize(img, 128)
        return img

    @property
    def n_views(self) -> int:
        return self.n_global + self.n_local

    def sizes(self) -> list[int]:
        return [self.global_size] * self.n_global + [self.local_size] * self.n_local

    def __call__(self, img: Image.Image) -> dict:
        if img.mode != "RGB":
            img = img.convert("RGB")
        W, H = img.size
        crops, boxes, flips = [], [], []
        for v in range(self.n_views):
            is_global = v < self.n_global
            size = self.global_size if is_global else self.local_size
            top, left, h, w = sample_crop(W, H, self.global_scale if is_global else self.local_scale)
            crop = TF.resized_crop(img, top, left, h, w, [size, size], T.InterpolationMode.BICUBIC)
            flip = random.random() < 0.5
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
