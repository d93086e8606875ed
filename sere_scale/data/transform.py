"""Per-sample SSL transform (multi-crop + iBOT masks) and the batch collate shared by every loader."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Optional

import torch

from sere_scale.data.corrupt import fill_corrupt
from sere_scale.data.masking import MaskGenerator
from sere_scale.data.multicrop import MultiCrop
from sere_scale.data.recipe import AugmentRecipe


def sample_seed(seed: int, epoch: int, index: int, rank: int = 0) -> int:
    """The one seed of a piece of data: (run seed, epoch, sample or batch index[, rank]) → a 63-bit integer.
    Per-sample CPU augmentation uses rank 0 (a sample's crops do not depend on who loads it); the device
    augmentation (``data.encoded.DeviceAugment``) seeds each rank's batch with its rank."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729 + rank * 15_485_863) % (2**63 - 1)


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed Python's and torch's RNG from (seed, epoch, index): the augmentation of a sample is a function of
    these three alone, whatever the worker or rank, so resumed runs see identical crops."""
    s = sample_seed(seed, epoch, index)
    random.seed(s)
    torch.manual_seed(s)


@contextmanager
def sample_rng(seed: int, epoch: int, index: int):
    """Run a block under ``seed_sample(seed, epoch, index)`` and restore the caller's RNG states afterwards, so
    loading data in the main process never disturbs the model's random streams (drop-path)."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        seed_sample(seed, epoch, index)
        try:
            yield
        finally:
            random.setstate(py_state)


class SSLTransform:
    """PIL image → ``{"crops", "boxes", "flips", "masks"}``; masks (n_global, h, w) for iBOT (zeros if off)."""

    def __init__(self, multicrop: MultiCrop, patch_size: int, masks: Optional[MaskGenerator] = None):
        self.multicrop, self.patch_size, self.masks = multicrop, patch_size, masks

    @classmethod
    def from_config(cls, cfg) -> "SSLTransform":
        d, il = cfg.data, cfg.image_loss
        from sere_scale.data.fastcrop import FastMultiCrop
        crop_cls = FastMultiCrop if d.crop_impl == "fast" else MultiCrop
        mc = crop_cls(recipe=AugmentRecipe.from_config(cfg))
        from sere_scale.config.arch import patch_size_of
        masks = MaskGenerator(il.mask_prob, il.mask_ratio, il.mask_aspect) if il.kind == "ibot" else None
        return cls(mc, patch_size_of(cfg.model), masks)

    def __call__(self, img) -> dict:
        out = self.multicrop(img)
        g = self.multicrop.global_size // self.patch_size
        if self.masks is not None:
            out["masks"] = torch.stack([self.masks(g, g) for _ in range(self.multicrop.n_global)])
        else:
            out["masks"] = torch.zeros(self.multicrop.n_global, g, g, dtype=torch.bool)
        return out


def collate_ssl(samples: list) -> dict:
    """Stack per-sample dicts into a batch of ``len(samples)``; corrupt samples (``None`` or ``corrupt.Corrupt``)
    are replaced by readable ones of the batch (``corrupt.fill_corrupt``) and counted.

    Batch: ``crops`` [V × (B,3,S,S)], ``boxes`` (B,V,4), ``flips`` (B,V), ``masks`` (B,n_global,h,w),
    ``labels`` (B,), ``n_corrupt`` (int).
    """
    good, n_bad = fill_corrupt(samples)
    V = len(good[0]["crops"])
    return {
        "crops": [torch.stack([s["crops"][v] for s in good]) for v in range(V)],
        "boxes": torch.stack([s["boxes"] for s in good]),
        "flips": torch.stack([s["flips"] for s in good]),
        "masks": torch.stack([s["masks"] for s in good]),
        "labels": torch.tensor([int(s.get("label", -1)) for s in good], dtype=torch.long),
        "n_corrupt": n_bad,
    }
