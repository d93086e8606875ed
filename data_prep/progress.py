"""Progress display: a tqdm bar (images/s) on a terminal, a log line every ``interval`` seconds otherwise."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, interval: float = 30.0, stream=None):
        self.total, self.desc, self.enabled, self.interval = total, desc, enabled, interval
        self.stream = stream or sys.stderr
        self.n, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        self.bar = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, unit="img", unit_scale=True, smoothing=0.1, file=self.stream)

    def update_to(self, n: int) -> None:
        if n == self.n:
            return
        if self.bar is not None:
            self.bar.update(n - self.n)
        self.n = n
        now = time.perf_counter()
        if self.enabled and self.bar is None and now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def rate(self) -> float:
        return self.n / max(time.perf_counter() - self.t0, 1e-9)

    def _line(self, now: float) -> None:
        r = self.rate()
        eta = (self.total - self.n) / r if r > 0 else float("inf")
        print(f"{self.desc}: {self.n}/{self.total} images, {r:.0f} img/s, ETA {eta / 60:.1f} min",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(time.perf_counter())
