"""Synthetic batches with the real batch format (random pixels, real crop boxes, flips and iBOT masks): the
"model alone" side of the profiler, independent of decoding and augmentation."""
from __future__ import annotations

import random

import torch

from sere_scale.data.masking import MaskGenerator
from sere_scale.data.recipe import AugmentRecipe, sample_crop


def synthetic_batch(cfg, batch_size: int, patch_size: int, seed: int = 0, width: int = 500,
                    height: int = 375) -> dict:
    d, il = cfg.data, cfg.image_loss
    rng_state = random.getstate()
    random.seed(seed)
    g = torch.Generator().manual_seed(seed)
    r = AugmentRecipe.from_config(cfg)
    V, sizes = r.n_views, r.sizes()
    crops = [torch.randn(batch_size, 3, s, s, generator=g) for s in sizes]
    rows = []
    for _ in range(batch_size):
        for v in range(V):
            top, left, h, w = sample_crop(width, height, r.scale(v), r.ratio)
            rows.append([left / width, top / height, (left + w) / width, (top + h) / height])
    boxes = torch.tensor(rows, dtype=torch.float32).reshape(batch_size, V, 4)  # one tensor (cheap under fake mode)
    flips = torch.rand(batch_size, V, generator=g) < r.flip_p
    hm = d.global_size // patch_size
    gen = MaskGenerator(il.mask_prob, il.mask_ratio, il.mask_aspect)
    masks = torch.stack([torch.stack([gen(hm, hm) if il.kind == "ibot" else torch.zeros(hm, hm, dtype=torch.bool)
                                      for _ in range(d.n_global)]) for _ in range(batch_size)])
    random.setstate(rng_state)
    return {"crops": crops, "boxes": boxes, "flips": flips, "masks": masks,
            "labels": torch.zeros(batch_size, dtype=torch.long), "n_corrupt": 0}


class SyntheticLoader:
    """Endless stream of a few pre-built synthetic batches (no data cost). ``device``: built there once (the
    step's move to the device is then a no-op: no host-to-device copy per step); default: on the host."""

    def __init__(self, cfg, patch_size: int, n_distinct: int = 2, device=None):
        self.batches = [synthetic_batch(cfg, cfg.data.batch_size, patch_size, seed=i) for i in range(n_distinct)]
        if device is not None:
            from sere_scale.data.device import to_device
            self.batches = [to_device(b, torch.device(device)) for b in self.batches]
        self.batches_per_epoch = 10**9

    def epoch_iter(self, epoch: int = 0, start_batch: int = 0):
        i = start_batch
        while True:
            yield self.batches[i % len(self.batches)]
            i += 1
