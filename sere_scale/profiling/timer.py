"""Named wall-clock regions; on CUDA each region boundary synchronises so times belong to their region."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch


class RegionTimer:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.sync = device.type == "cuda"
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        t0 = self._now()
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()
            dt = self._now() - t0
            self.totals[name] += dt
            if self._stack:  # nested: attribute the time to the inner region only
                self.totals[self._stack[-1]] -= dt

    def reset(self) -> None:
        self.totals.clear()
