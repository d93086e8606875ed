"""Single-process and DDP engine (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from sere_scale.engine.base import Engine, apply_ac_and_compile, ema_, load_rng_state, rng_state
from sere_scale.engine.params import last_layer_params, param_groups


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, cfg, student, teacher, method, info):
        super().__init__(cfg, student, teacher, method, info)
        student.to(self.device)
        teacher.to(self.device)
        method.to(self.device)
        self.student = self.parallelize(student, cfg, info)
        apply_ac_and_compile(teacher, False, cfg.engine.compile)
        self.teacher = teacher
        o = cfg.optim
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(student), lr=0.0, betas=o.betas, fused=fused)
        self.scaler = self.make_grad_scaler()
        self._last = last_layer_params(student)
        self._pairs = self._ema_pairs(student, teacher)

    @staticmethod
    def parallelize(student, cfg, info):
        """Activation checkpointing → compile per block → DDP (when distributed)."""
        apply_ac_and_compile(student, cfg.model.checkpoint_activations, cfg.engine.compile)
        if not info.distributed:
            return student
        dev = info.device
        # BatchNorm statistics are already global (SyncTokenBatchNorm); no buffer broadcast per forward.
        # Newer torch names the switch forward_sync_buffers; older releases (≥ 2.11 supported) broadcast_buffers.
        sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                else {"broadcast_buffers": False})
        return DDP(student, device_ids=[dev.index] if dev.type == "cuda" else None, **sync)

    @staticmethod
    def _ema_pairs(student, teacher):
        sp = dict(student.named_parameters())
        return [(sp[n], p) for n, p in teacher.named_parameters() if n in sp]

    def no_sync(self, active: bool):
        if active and isinstance(self.student, DDP):
            return self.student.no_sync()
        return super().no_sync(active)

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def total_grad_norm(self):
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, 2.0)  # gradients are all-reduced already: global

    def step(self, lr, wd, freeze_last_layer, norm=None) -> Optional[torch.Tensor]:
        return self.clipped_step(lr, wd, freeze_last_layer, norm)

    @torch.no_grad()
    def ema_update(self, momentum):
        ema_([b for _, b in self._pairs], [a for a, _ in self._pairs], momentum)

    # ------------------------------------------------------------------ checkpoints
    def save(self, ckpt_dir, train_state):
        if self.info.is_main:
            torch.save({"student": self.student_module.state_dict(), "teacher": self.teacher.state_dict(),
                        "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                        "method": self.method.state_dict(), "train_state": train_state},
                       os.path.join(ckpt_dir, "model.pt"))
        torch.save(rng_state(), os.path.join(ckpt_dir, f"rng_rank{self.info.rank:05d}.pt"))

    def load(self, ckpt_dir):
        sd = torch.load(os.path.join(ckpt_dir, "model.pt"), map_location=self.device, weights_only=False)
        self.student_module.load_state_dict(sd["student"])
        self.teacher.load_state_dict(sd["teacher"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.load_grad_scaler(self.scaler, sd["scaler"])
        self.method.load_state_dict(sd["method"])
        load_rng_state(ckpt_dir, self.info.rank)
        return sd["train_state"]

    def teacher_state_dict(self):
        return self.teacher.state_dict()


def read_ddp_teacher(ckpt_dir: str | Path) -> dict:
    """The teacher state dict of a DDP checkpoint (``model.pt``), on CPU."""
    return torch.load(Path(ckpt_dir) / "model.pt", map_location="cpu", weights_only=False)["teacher"]


def read_ddp_student(ckpt_dir: str | Path) -> dict:
    """The student state dict of a DDP checkpoint (``model.pt``), on CPU."""
    return torch.load(Path(ckpt_dir) / "model.pt", map_location="cpu", weights_only=False)["student"]
