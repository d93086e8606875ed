"""Patch-token feature maps of a timm ViT at any input size, and the image preprocessing of the dense probes.

:func:`patch_features` gives ``(B, C·layers, h, w)`` maps:

* the images are padded on the right and bottom (with zeros, *after* normalisation) to a multiple of the patch
  size, so every pixel lies in one patch; ``h, w`` = the padded size // patch size;
* the absolute position embedding is resampled to the ``h × w`` grid by the model's own dynamic-size path
  (``VisionTransformer._pos_embed`` → ``timm.layers.resample_abs_pos_embed``: bicubic, antialiased). A model built
  without ``dynamic_img_size`` is switched to it in place (:func:`dynamic_size_vit`); this also holds for a
  backbone trained with ``model.dino_pos_embed`` (that option only changes how 96-px local crops were embedded);
* the tokens come from ``VisionTransformer.forward_intermediates(..., norm=True)``: every returned layer goes
  through the model's final norm — for the last layer exactly what ``forward_features`` returns, for the earlier
  ones the convention of dinov2's ``get_intermediate_layers(norm=True)`` (its linear segmentation heads);
* CLS and register tokens are dropped; ``layers=n`` concatenates the last ``n`` blocks along channels,
  the earliest first.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD


def unwrap_vit(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer of a project :class:`~sere_scale.models.backbone.ViTBackbone` (its ``.vit``) or
    the model itself; anything without ``forward_intermediates`` and ``patch_embed`` is refused."""
    vit = getattr(model, "vit", model)
    if not (hasattr(vit, "forward_intermediates") and hasattr(vit, "patch_embed")):
        raise TypeError(f"{type(model).__name__} is neither a timm VisionTransformer nor a ViTBackbone")
    return vit


def patch_size_of(model: nn.Module) -> int:
    p = unwrap_vit(model).patch_embed.patch_size
    if p[0] != p[1]:
        raise ValueError(f"non-square patches {tuple(p)} are not supported")
    return int(p[0])


def dynamic_size_vit(vit: nn.Module) -> nn.Module:
    """Turn on timm's dynamic image size on a VisionTransformer built without it, setting exactly what its
    constructor sets for ``dynamic_img_size=True`` (patch embedding: NHWC output, no size check). Outputs at the
    native size are unchanged (the resampling is the identity there)."""
    if not getattr(vit, "dynamic_img_size", False):
        from timm.layers import Format
        pe = vit.patch_embed
        pe.strict_img_size, pe.flatten, pe.output_fmt = False, False, Format("NHWC")
        vit.dynamic_img_size = True
    return vit


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0) -> torch.Tensor:
    """``x`` (..., H, W) padded on the right and bottom to the next multiple of ``multiple``."""
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (0, pw, 0, ph), value=value)


def autocast_for(device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the frozen backbone on CUDA, nothing elsewhere."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """Float32 ``(B, C·layers, h, w)`` patch-token maps of normalised ``images`` (B, 3, H, W) of any size (see the
    module docstring for padding, position embedding and norm)."""
    vit = dynamic_size_vit(unwrap_vit(model))
    if layers < 1 or layers > len(vit.blocks):
        raise ValueError(f"layers={layers}: the model has {len(vit.blocks)} blocks")
    x = pad_to_multiple(images, patch_size_of(vit))
    with autocast_for(x.device):
        maps = vit.forward_intermediates(x, indices=layers, norm=True, output_fmt="NCHW", intermediates_only=True)
    return torch.cat([m.float() for m in maps], dim=1)


# ------------------------------------------------------------------------------------------ preprocessing
def resize_short(img: Image.Image, size: int, resample=Image.BILINEAR) -> Image.Image:
    """``img`` resized so that its short side is ``size`` (aspect kept; mmsegmentation's keep-ratio resize)."""
    w, h = img.size
    s = size / min(w, h)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    return img if new == (w, h) else img.resize(new, resample)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float tensor normalised with the ImageNet mean and std."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def resize_labels(m: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Integer labels resized to ``size_wh`` (width, height) with nearest neighbours."""
    if (m.shape[1], m.shape[0]) == tuple(size_wh):
        return m
    return np.asarray(Image.fromarray(m.astype(np.int32)).resize(size_wh, Image.NEAREST)).astype(np.int64)


def scores_to_label_size(scores: torch.Tensor, patch: int, resized_hw: tuple[int, int],
                         label_hw: tuple[int, int]) -> torch.Tensor:
    """Patch-grid scores (B, K, h, w) of a padded image whose unpadded size was ``resized_hw``, brought to
    ``label_hw``: bilinear to the padded pixel grid (h·patch, w·patch), crop of the padding, then bilinear to the
    label size (skipped when it is the resized size)."""
    h, w = scores.shape[-2:]
    x = F.interpolate(scores, size=(h * patch, w * patch), mode="bilinear", align_corners=False)
    x = x[..., :resized_hw[0], :resized_hw[1]]
    if tuple(label_hw) != tuple(resized_hw):
        x = F.interpolate(x, size=tuple(label_hw), mode="bilinear", align_corners=False)
    return x


class ResizedPairs(torch.utils.data.Dataset):
    """Items of a :class:`~.layouts.SegDataset` with the image resized to short side ``size``: (normalised image
    (3, H', W'), labels resized with nearest neighbours (H', W'), labels at their own size (H, W), index)."""

    def __init__(self, ds, size: int):
        self.ds, self.size = ds, int(size)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, m = self.ds.load(i)
        img = resize_short(img, self.size)
        return to_tensor(img), torch.from_numpy(resize_labels(m, img.size)), torch.from_numpy(m), i


def first_item(items):
    """Collate of a batch of one (images of different sizes)."""
    return items[0]


def iterate(dataset: torch.utils.data.Dataset, num_workers: int, what: str, batch_size: int = 1,
            sampler=None, collate=first_item, generator=None):
    """The items of ``dataset`` through the project's loader workers (data/workers.py: forkserver, job signals
    held, batch timeout naming ``what``)."""
    from torch.utils.data import DataLoader

    from sere_scale.data.worker_signals import job_signals_held
    from sere_scale.data.workers import DEFAULT_TIMEOUT_S, Workers
    workers = Workers(num_workers, DEFAULT_TIMEOUT_S, what)
    dl = DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler, collate_fn=collate,
                    generator=generator, **workers.kwargs(persistent=False))
    with job_signals_held():
        batches = iter(dl)
    yield from workers.guard(batches)
