"""Linear segmentation probe on a frozen backbone (the iBOT / dinov2 linear protocol).

Head: ``BatchNorm2d`` + 1×1 convolution on the patch-token maps (``layers=1``: the last block; ``layers=4``: the
last four concatenated, features.py). Logits are upsampled bilinearly to the label size; cross-entropy ignores
``ignore_index`` and averages over the batch's labelled pixels. AdamW (lr 1e-3, weight decay 1e-4 as dinov2's
configs), linear warm-up from lr·1e-6 over ``warmup`` iterations, then poly (power 1, to 0) or cosine decay.

* ``linear`` (:func:`train_linear`): each iteration reads ``batch_size`` images (seeded shuffles of the split,
  repeated), resizes each to short side ``size``, takes a random resized crop (area 25-100 % of the resized image,
  aspect 3/4-4/3) scaled to ``crop × crop`` and flips it with probability ½ — the mask alike with nearest
  neighbours; the backbone runs on every crop.
* ``linear-cached`` (:func:`train_linear_cached`): no augmentation; the maps of the resized whole images are
  computed once (kept on the CPU in float16, with uint8 or int32 labels) and the head trains on them. Images of
  different sizes form one BatchNorm batch by concatenating their flattened maps (the same statistics as a batch
  of equal-sized maps). Fast, but holds the whole split's maps in memory.

Inference (:func:`predict_scores`): ``whole`` (the resized image at once) or ``slide`` (``crop × crop`` windows
at ``stride``, mmsegmentation's window placement; logits of overlapping windows averaged), then bilinear to the
label's own size and argmax.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from sere_scale.eval.dense.features import (ResizedPairs, iterate, resize_labels, resize_short, scores_to_label_size,
                                             to_tensor)

CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)


class LinearSegHead(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(f))


def lr_at(step: int, iters: int, lr: float, warmup: int, schedule: str) -> float:
    """Linear warm-up from lr·1e-6 to lr over ``warmup`` steps, then poly (power 1) or cosine decay to 0."""
    if step < warmup:
        return lr * (1e-6 + (1 - 1e-6) * step / warmup)
    t = (step - warmup) / max(1, iters - warmup)
    if schedule == "poly":
        return lr * (1 - t)
    if schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * t))
    raise ValueError(f"schedule must be 'poly' or 'cosine', got '{schedule}'")


class CropPairs(torch.utils.data.Dataset):
    """Random resized crops (and flips) of ``ds``'s images and masks, for :func:`train_linear`."""

    def __init__(self, ds, size: int, crop: int):
        self.ds, self.size, self.crop = ds, int(size), int(crop)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        img, m = self.ds.load(i)
        img = resize_short(img, self.size)
        lab = Image.fromarray(resize_labels(m, img.size).astype(np.int32))
        top, left, h, w = T.RandomResizedCrop.get_params(img, CROP_SCALE, CROP_RATIO)  # torch's RNG (seeded)
        box, out = (left, top, left + w, top + h), (self.crop, self.crop)
        img, lab = img.resize(out, Image.BILINEAR, box=box), lab.resize(out, Image.NEAREST, box=box)
        x, y = to_tensor(img), torch.from_numpy(np.asarray(lab).astype(np.int64))
        if torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


def _ce_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, int]:
    return (F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum"),
            int((target != ignore_index).sum()))


def _optimizer(head, lr, weight_decay):
    return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)


def _step(opt, head, loss_sum, n_valid, lr) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    if n_valid:  # a batch without a labelled pixel teaches nothing (BN statistics still move)
        (loss_sum / n_valid).backward()
        opt.step()


def train_linear(features_fn, patch: int, channels: int, ds, size: int, crop: int, iters: int, batch_size: int,
                 lr: float = 1e-3, weight_decay: float = 1e-4, warmup: int = 1500, schedule: str = "poly",
                 seed: int = 0, device="cpu", num_workers: int = 0) -> LinearSegHead:
    """The head trained on augmented crops of the training split ``ds`` (``features_fn``: normalised images
    (B, 3, H, W) → maps (B, C, h, w), no gradient)."""
    torch.manual_seed(seed)
    head = LinearSegHead(channels, ds.num_classes).to(device).train()
    opt = _optimizer(head, lr, weight_decay)
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(range(len(ds)), num_samples=iters * batch_size, generator=g)
    batches = iterate(CropPairs(ds, size, crop), num_workers, f"segmentation data '{ds.root}'",
                      batch_size=batch_size, sampler=sampler, collate=None, generator=g)
    for step, (x, y) in enumerate(batches):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            f = features_fn(x)
        logits = scores_to_label_size(head(f), patch, tuple(x.shape[-2:]), tuple(x.shape[-2:]))
        loss_sum, n_valid = _ce_sum(logits, y, ds.ignore_index)
        _step(opt, head, loss_sum, n_valid, lr_at(step, iters, lr, min(warmup, iters // 2), schedule))
    return head.eval()


@torch.no_grad()
def cache_features(features_fn, ds, size: int, device="cpu", num_workers: int = 0):
    """(float16 CPU maps (C, h, w), resized labels (H', W'): uint8 when they fit, else int32) of each image."""
    dtype = torch.uint8 if ds.num_classes <= 256 and 0 <= ds.ignore_index < 256 else torch.int32
    maps, labels = [], []
    for x, lab, _, _ in iterate(ResizedPairs(ds, size), num_workers, f"segmentation data '{ds.root}'"):
        maps.append(features_fn(x[None].to(device))[0].half().cpu())
        labels.append(lab.to(dtype))
    return maps, labels


def train_linear_cached(maps, labels, patch: int, num_classes: int, ignore_index: int, iters: int,
                        batch_size: int, lr: float = 1e-3, weight_decay: float = 1e-4, warmup: int = 1500,
                        schedule: str = "poly", seed: int = 0, device="cpu") -> LinearSegHead:
    """The head trained on cached maps and labels (:func:`cache_features`), ``batch_size`` images a step."""
    torch.manual_seed(seed)
    head = LinearSegHead(maps[0].shape[0], num_classes).to(device).train()
    opt = _optimizer(head, lr, weight_decay)
    g = torch.Generator().manual_seed(seed)
    order = iter(torch.utils.data.RandomSampler(range(len(maps)), num_samples=iters * batch_size, generator=g))
    for step in range(iters):
        idx = [next(order) for _ in range(batch_size)]
        fs = [maps[i].to(device).float() for i in idx]
        flat = torch.cat([f.flatten(1) for f in fs], dim=1)  # (C, Σ h·w): one BatchNorm batch
        out = head(flat[None, :, None, :])[0, :, 0].split([f.shape[1] * f.shape[2] for f in fs], dim=1)
        loss_sum, n_valid = 0.0, 0
        for o, f, i in zip(out, fs, idx):
            y = labels[i].to(device).long()
            logits = scores_to_label_size(o.reshape(1, -1, *f.shape[1:]), patch, tuple(y.shape), tuple(y.shape))
            s, n = _ce_sum(logits, y[None], ignore_index)
            loss_sum, n_valid = loss_sum + s, n_valid + n
        _step(opt, head, loss_sum, n_valid, lr_at(step, iters, lr, min(warmup, iters // 2), schedule))
    return head.eval()


def window_starts(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """mmsegmentation's slide windows along one axis: (start, end) pairs, the last moved back to end at the edge;
    one window of the whole axis when it is shorter than the crop."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for j in range(n):
        end = min(j * stride + crop, length)
        out.append((max(end - crop, 0), end))
    return out


def slide_scores(x: torch.Tensor, scores_fn, crop: int, stride: int) -> torch.Tensor:
    """Pixel scores (1, K, H, W) of an image (1, 3, H, W) as the average of ``scores_fn`` (window → (1, K, h, w) at
    the window's pixel size) over the windows covering each pixel."""
    H, W = x.shape[-2:]
    total, count = None, torch.zeros(1, 1, H, W, device=x.device)
    for y0, y1 in window_starts(H, crop, stride):
        for x0, x1 in window_starts(W, crop, stride):
            s = scores_fn(x[..., y0:y1, x0:x1])
            if total is None:
                total = torch.zeros(1, s.shape[1], H, W, device=x.device, dtype=s.dtype)
            total[..., y0:y1, x0:x1] += s
            count[..., y0:y1, x0:x1] += 1
    return total / count


@torch.no_grad()
def predict_scores(features_fn, head: LinearSegHead, patch: int, x: torch.Tensor, label_hw: tuple[int, int],
                   mode: str = "whole", crop: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Class scores (1, K, *label_hw) of a resized, normalised image ``x`` (1, 3, H', W')."""
    def pixel_scores(xw):
        return scores_to_label_size(head(features_fn(xw)), patch, tuple(xw.shape[-2:]), tuple(xw.shape[-2:]))
    if mode == "whole":
        s = pixel_scores(x)
    elif mode == "slide":
        if not crop:
            raise ValueError("sliding-window inference needs a crop size")
        s = slide_scores(x, pixel_scores, crop, stride or max(1, (2 * crop) // 3))
    else:
        raise ValueError(f"inference must be 'whole' or 'slide', got '{mode}'")
    if tuple(s.shape[-2:]) != tuple(label_hw):
        s = F.interpolate(s, size=tuple(label_hw), mode="bilinear", align_corners=False)
    return s


@torch.no_grad()
def linear_evaluate(features_fn, head: LinearSegHead, patch: int, ds, size: int, meter, mode: str = "whole",
                    crop: int | None = None, stride: int | None = None, device="cpu", num_workers: int = 0) -> None:
    """Predict every image of ``ds`` (resized to short side ``size``) and add it to ``meter`` at the label's size."""
    for x, _, lab, i in iterate(ResizedPairs(ds, size), num_workers, f"segmentation data '{ds.root}'"):
        s = predict_scores(features_fn, head, patch, x[None].to(device), tuple(lab.shape), mode, crop, stride)
        try:
            meter.update(s[0].argmax(0).cpu(), lab)
        except ValueError as e:
            raise ValueError(f"'{ds.items[i][1]}': {e}") from None
