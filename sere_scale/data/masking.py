"""iBOT block masking (BEiT-style rectangles) for student global views."""
from __future__ import annotations

import math
import random

import torch


def block_mask(h: int, w: int, num_masked: int, aspect=(0.3, 1 / 0.3), min_block: int = 4,
               rng: random.Random | None = None) -> torch.Tensor:
    """A (h, w) bool mask with about ``num_masked`` cells set, built from random rectangles.

    Rectangles of area in [min_block, remaining] and aspect ratio log-uniform in ``aspect`` are added until the
    target is reached or no rectangle adds cells for 10 tries.
    """
    rng = rng or random
    mask = torch.zeros(h, w, dtype=torch.bool)
    num_masked = min(num_masked, h * w)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    count = 0
    while count < num_masked:
        remaining = num_masked - count
        added = 0
        for _ in range(10):
            area = rng.uniform(min(min_block, remaining), remaining)
            ar = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if 0 < bh <= h and 0 < bw <= w:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                patch = mask[top:top + bh, left:left + bw]
                new = int((~patch).sum())
                if 0 < new <= remaining:
                    patch.fill_(True)
                    added = new
                    break
        if added == 0:
            break
        count += added
    return mask


class MaskGenerator:
    """Per-image iBOT masks: with probability ``1 - prob`` none, else ratio ~ U(ratio) of the patches."""

    def __init__(self, prob: float = 0.5, ratio=(0.1, 0.5), aspect=(0.3, 1 / 0.3)):
        self.prob, self.ratio, self.aspect = prob, tuple(ratio), tuple(aspect)

    def __call__(self, h: int, w: int) -> torch.Tensor:
        if self.prob <= 0 or random.random() >= self.prob:
            return torch.zeros(h, w, dtype=torch.bool)
        r = random.uniform(*self.ratio)
        return block_mask(h, w, int(round(r * h * w)), self.aspect)
