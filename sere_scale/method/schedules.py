"""Per-step schedules of METHOD.md: lr warmup + cosine, weight decay cosine, teacher momentum cosine,
teacher temperature linear warmup."""
from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(start: float, end: float, progress: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


@dataclass
class Schedules:
    """All schedules as pure functions of the optimiser step (exact resume needs nothing else)."""

    steps_per_epoch: int
    epochs: int
    lr: float  # already scaled by global_batch / 256
    min_lr: float
    warmup_epochs: float
    wd: float
    wd_end: float
    momentum: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: float
    teacher_patch_temp: float
    warmup_teacher_patch_temp: float

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def lr_at(self, step: int) -> float:
        # as DINO's cosine_scheduler: np.linspace(0, lr, W) over the W warmup steps (the base rate reached at the
        # last warmup step, end included), then the cosine from lr over the remaining steps
        warm = int(self.warmup_epochs * self.steps_per_epoch)
        if step < warm:
            return self.lr * step / (warm - 1) if warm > 1 else 0.0
        return cosine(self.lr, self.min_lr, (step - warm) / max(self.total_steps - warm, 1))

    def wd_at(self, step: int) -> float:
        return cosine(self.wd, self.wd_end, step / max(self.total_steps, 1))

    def momentum_at(self, step: int) -> float:
        return cosine(self.momentum, 1.0, step / max(self.total_steps, 1))

    def _temp(self, start: float, end: float, step: int) -> float:
        # per epoch, as np.linspace(start, end, W)[epoch] for epoch < W, then constant (DINO)
        e, W = int(self.epoch_of(step)), int(self.warmup_teacher_temp_epochs)
        if W <= 1 or e >= W:
            return end
        return start + (end - start) * e / (W - 1)

    def at(self, step: int) -> dict:
        return {"lr": self.lr_at(step), "wd": self.wd_at(step), "momentum": self.momentum_at(step),
                "teacher_temp": self._temp(self.warmup_teacher_temp, self.teacher_temp, step),
                "teacher_patch_temp": self._temp(self.warmup_teacher_patch_temp, self.teacher_patch_temp, step),
                "epoch": self.epoch_of(step)}


def build_schedules(cfg, steps_per_epoch: int, world_size: int) -> Schedules:
    o, il = cfg.optim, cfg.image_loss
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    return Schedules(steps_per_epoch, cfg.train.epochs, o.base_lr * global_batch / 256, o.min_lr,
                     o.warmup_epochs, o.weight_decay, o.weight_decay_end, o.momentum_teacher, il.teacher_temp,
                     il.warmup_teacher_temp, il.warmup_teacher_temp_epochs, il.teacher_patch_temp,
                     il.warmup_teacher_patch_temp)
