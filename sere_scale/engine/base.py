"""The engine interface and what every backend shares (precision, schedules on param groups, RNG state)."""
from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np
import torch


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Engine:
    """Backend-neutral training operations. Subclasses set ``student`` (the callable to run the student,
    possibly wrapped), ``teacher`` and ``optimizer``, and implement the abstract methods."""

    name = "base"

    def __init__(self, cfg, student, teacher, method, info):
        self.cfg, self.info, self.method = cfg, info, method
        self.device = info.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.student_module, self.teacher_module = student, teacher

    # ------------------------------------------------------------------ forward
    def autocast(self):
        if self.precision in ("bf16", "fp16") and self.device.type == "cuda":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        if self.precision == "bf16" and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def no_sync(self, active: bool):
        """Context for micro-steps that must not all-reduce gradients (gradient accumulation)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ to implement
    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self, lr: float, wd: float, freeze_last_layer: bool) -> Optional[float]:
        """Clip, apply lr/wd, step the optimiser, zero gradients; returns the gradient norm (or None)."""
        raise NotImplementedError

    def zero_grad(self) -> None:
        raise NotImplementedError

    def ema_update(self, momentum: float) -> None:
        raise NotImplementedError

    def save(self, ckpt_dir: str, train_state: dict) -> None:
        """Write this rank's part of a checkpoint into ``ckpt_dir`` (a temporary folder made atomic by the
        caller). ``train_state`` holds step, data position and method state."""
        raise NotImplementedError

    def load(self, ckpt_dir: str) -> dict:
        raise NotImplementedError

    def teacher_state_dict(self) -> dict:
        """The full (gathered) teacher state dict, on rank 0 at least; used for evaluation and export."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared helpers
    def set_lr_wd(self, optimizer, lr: float, wd: float) -> None:
        for g in optimizer.param_groups:
            g["lr"] = lr
            if g.get("apply_wd", True):
                g["weight_decay"] = wd
            else:
                g["weight_decay"] = 0.0
