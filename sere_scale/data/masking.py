"""iBOT block masking (BEiT's rectangles, as iBOT draws them) for student global views."""
from __future__ import annotations

import math
import random

import torch


def block_mask(h: int, w: int, target: float, aspect=(0.3, 1 / 0.3),
               rng: random.Random | None = None) -> torch.Tensor:
    """A (h, w) bool mask of at most ``target`` cells (a real number), built from random rectangles.

    The published recipe (docs/METHOD.md): while masked < target, remaining = target - masked and up to 10 tries
    draw an area ~ U(low, remaining) with low = (min(h, w) // 3)² (the uniform lies between the two bounds in
    either order), an aspect ratio log-uniform in ``aspect``, a block of round(√(area·aspect)) ×
    round(√(area/aspect)) cells accepted only if strictly smaller than the grid on both sides, placed uniformly;
    the first try adding between 1 and remaining new cells is kept. Stops when no try adds a cell.
    Deterministic in ``rng`` (default: the ``random`` module, which the data pipeline seeds per sample).
    """
    rng = rng or random
    low = (min(h, w) // 3) ** 2
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    rows = [bytearray(w) for _ in range(h)]
    masked = 0
    while masked < target:
        remaining = target - masked
        added = 0
        for _ in range(10):
            area = rng.uniform(low, remaining)
            ar = math.exp(rng.uniform(*log_aspect))
            bh = int(round(math.sqrt(area * ar)))
            bw = int(round(math.sqrt(area / ar)))
            if bh < h and bw < w:
                top, left = rng.randint(0, h - bh), rng.randint(0, w - bw)
                new = bh * bw - sum(sum(rows[r][left:left + bw]) for r in range(top, top + bh))
                if 0 < new <= remaining:
                    for r in range(top, top + bh):
                        rows[r][left:left + bw] = b"\x01" * bw
                    added = new
                    break
        if added == 0:
            break
        masked += added
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(h, w).bool()


class MaskGenerator:
    """Per-image iBOT masks: with probability ``1 - prob`` none, else a target of ratio·h·w cells (kept real),
    ratio ~ U(ratio)."""

    def __init__(self, prob: float = 0.5, ratio=(0.1, 0.5), aspect=(0.3, 1 / 0.3)):
        self.prob, self.ratio, self.aspect = prob, tuple(ratio), tuple(aspect)

    def __call__(self, h: int, w: int) -> torch.Tensor:
        if self.prob <= 0 or random.random() >= self.prob:
            return torch.zeros(h, w, dtype=torch.bool)
        r = random.uniform(*self.ratio)
        return block_mask(h, w, r * h * w, self.aspect)
