"""What the training loop logs: per-window throughput, data wait and MFU, and the record of a logging step."""
from __future__ import annotations

import contextlib
import time

from sere_scale.run.step import StepResult, first_nonfinite


class LiveMFU:
    """Counts one optimiser step's FLOPs (this rank) once, then reports model FLOPs utilisation."""

    def __init__(self, device, precision: str):
        self.device, self.precision = device, precision
        self.flops_per_step, self.peak, self._tried = 0, None, False

    @contextlib.contextmanager
    def counting(self):
        """Around a step: the first one is counted (``profiling.flops.counting_flops``), the others are not."""
        if self._tried:
            yield
            return
        self._tried = True
        from sere_scale.profiling.flops import counting_flops, device_peak
        self.peak, _ = device_peak(self.device, self.precision)
        with counting_flops() as total:
            yield
        self.flops_per_step = total[0]

    def value(self, steps: int, seconds: float) -> float:
        return self.flops_per_step * steps / max(seconds, 1e-12) / self.peak


class LogWindow:
    """Steps, images, corrupt images and data wait since the last logging step."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.reset()

    def reset(self) -> None:
        self.t0, self.imgs, self.corrupt, self.wait, self.steps = time.perf_counter(), 0, 0, 0.0, 0

    def add(self, res: StepResult) -> None:
        self.imgs += self.global_batch
        self.steps += 1
        self.corrupt += res.n_corrupt
        self.wait += res.data_wait_s

    def take_corrupt(self) -> int:
        n, self.corrupt = self.corrupt, 0
        return n

    def record(self, step: int, s: dict, res: StepResult, state: dict, engine, mfu) -> dict:
        """The metrics record of a logging step (host syncs here only: losses, grad norm, loss scale)."""
        dt = time.perf_counter() - self.t0
        rec = {"step": step, "epoch": s["epoch"], "lr": s["lr"], "wd": s["wd"], "momentum": s["momentum"],
               "teacher_temp": s["teacher_temp"], "img_per_s": self.imgs / max(dt, 1e-9),
               "grad_norm": float(res.grad_norm) if res.grad_norm is not None else None,
               "n_corrupt": state["n_corrupt"], "n_skipped": state["n_skipped"],
               "data_wait_pct": 100.0 * self.wait / max(dt, 1e-9)}
        outs = res.outs
        if not res.finite:
            rec["skipped"] = True  # train.nonfinite=skip: this step's (non-finite) losses, no update
            outs = [first_nonfinite(res)]
        if mfu is not None and mfu.flops_per_step:
            rec["mfu"] = mfu.value(self.steps, dt)
        scale = engine.loss_scale()
        if scale is not None:  # fp16: the scale after this step, and the steps skipped on overflow so far
            rec["loss_scale"], rec["n_overflow"] = scale, state.get("n_overflow", 0)
        for key in outs[0]:
            rec[key] = sum(float(o[key].detach()) for o in outs) / len(outs)
        return rec
