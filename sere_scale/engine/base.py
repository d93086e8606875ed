"""The engine interface and what every backend shares (precision, schedules on param groups, RNG state)."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Optional

import numpy as np
import torch

from sere_scale.engine.precision import lowp_dtype, resolve_precision


def ensure_process_group(info) -> None:
    """Sharded engines need a process group even in a single process: make a one-rank group (no port)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if info.world_size > 1:
        raise RuntimeError("a multi-rank run without a process group: launch under torchrun, deepspeed, "
                           "accelerate or srun (see docs/LAUNCH.md)")
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# Elements per EMA chunk: bounds the temporary buffer of ``ema_`` (64 MiB of fp32).
_EMA_CHUNK = 1 << 24


@torch.no_grad()
def ema_(teacher: list, student: list, momentum: float) -> None:
    """``teacher ← momentum·teacher + (1 − momentum)·student`` on lists of fp32 tensors, in place.

    Two separately rounded products and one rounded sum (never a fused multiply-add), so the value of an
    element does not depend on where it sits in its tensor: the EMA of a shard is bitwise the shard of the EMA
    of the full tensor. Every engine applies it to the pieces it holds (full tensors, FSDP2 local shards,
    ZeRO partitions)."""
    for t, s in zip(teacher, student):
        if t.dtype != torch.float32 or s.dtype != torch.float32:
            raise TypeError(f"EMA runs in fp32; got teacher {t.dtype}, student {s.dtype}")
        if t.shape != s.shape:
            raise ValueError(f"EMA pieces differ in shape: teacher {tuple(t.shape)}, student {tuple(s.shape)}")
    i = 0
    while i < len(teacher):
        j, n = i, 0
        while j < len(teacher) and (n == 0 or n + teacher[j].numel() <= _EMA_CHUNK):
            n += teacher[j].numel()
            j += 1
        t, s = list(teacher[i:j]), [x.detach() for x in student[i:j]]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, torch._foreach_mul(s, 1.0 - momentum))
        i = j


def cast_floating(x, dtype: torch.dtype):
    """``x`` with every floating-point tensor inside (tuples, lists, dicts) cast to ``dtype``."""
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(cast_floating(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: cast_floating(v, dtype) for k, v in x.items()}
    return x


def apply_ac_and_compile(net, ac: bool, compile_blocks: bool) -> None:
    """The first two steps of every backend's ``parallelize`` (torchtitan order: activation checkpointing →
    compile → wrapping/sharding): per-block activation checkpointing (the plan's switch), then
    ``torch.compile`` of each transformer block in place (parameter names unchanged); the units come from the
    network's ``parallel_plan()`` (``models/plan.py``)."""
    plan = net.parallel_plan()
    plan.set_activation_checkpointing(ac)
    if compile_blocks:
        for blk in plan.blocks:
            blk.compile()


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def load_rng_state(ckpt_dir: str, rank: int) -> None:
    """This rank's RNG state from a checkpoint folder, where it was saved (``rng_rank{rank:05d}.pt``)."""
    path = os.path.join(ckpt_dir, f"rng_rank{rank:05d}.pt")
    if os.path.exists(path):
        set_rng_state(torch.load(path, weights_only=False))


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
    # False: the training step checks finiteness (and preemption) once, before the last micro-batch's backward
    # (one host sync per step); True: before every micro-batch's backward (``step.train_step``)
    check_every_micro_batch = False

    def __init__(self, cfg, student, teacher, method, info):
        self.cfg, self.info, self.method = cfg, info, method
        self.device = info.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.student_module, self.teacher_module = student, teacher
        # set by ``step``: the fp16 loss scaler found an inf/NaN gradient (on any rank) and the optimiser did
        # not step; the loop then leaves the teacher and the centers alone too
        self.step_skipped = False

    def loss_scale(self) -> Optional[float]:
        """The current fp16 loss scale (None without loss scaling); engines with a torch ``scaler`` report its
        scale, DeepSpeed overrides this."""
        scaler = getattr(self, "scaler", None)
        return scaler.get_scale() if scaler is not None and scaler.is_enabled() else None

    # ------------------------------------------------------------------ forward
    def autocast(self):
        """bf16/fp16 autocast on any device (CPU autocast supports both); fp32: nothing."""
        dtype = lowp_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def no_sync(self, active: bool):
        """Context for micro-steps that must not all-reduce gradients (gradient accumulation)."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ to implement
    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def grad_norm(self, freeze_last_layer: bool) -> Optional[torch.Tensor]:
        """The global gradient norm as a device tensor (no host sync), after dropping the frozen last layer's
        gradients; None under fp16, where gradients are still scaled and the loss scaler checks them. The step
        votes on its finiteness before ``step`` (``run/step.py``). Engines with ``check_every_micro_batch``
        are not asked: their ``step`` must skip a non-finite gradient itself and set ``step_skipped``."""
        if freeze_last_layer:
            for p in self._last:
                p.grad = None
        if self.precision == "fp16":
            return None
        return self.total_grad_norm()

    def total_grad_norm(self) -> torch.Tensor:
        """The 2-norm of all gradients of all ranks (a device tensor)."""
        raise NotImplementedError

    def step(self, lr: float, wd: float, freeze_last_layer: bool, norm: Optional[torch.Tensor] = None):
        """Clip, apply lr/wd, step the optimiser, zero gradients; returns the gradient norm (or None) and sets
        ``step_skipped``. ``norm``: ``grad_norm``'s value when the step already computed it."""
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

    def saved_tensors(self) -> list:
        """(name, tensor) of this rank's pieces of what a checkpoint holds besides the optimiser: the student's
        and teacher's parameters and buffers (full tensors, FSDP2 local shards, ZeRO-3 partitions) and the
        method's state (centers). ``checkpoint.count_nonfinite`` checks them before every save."""
        out = []
        for prefix, m in (("student", self.student_module), ("teacher", self.teacher_module),
                          ("method", self.method)):
            if not isinstance(m, torch.nn.Module):
                continue
            for n, t in [*m.named_parameters(), *m.named_buffers()]:
                t = getattr(t, "ds_tensor", t)  # a ZeRO-3 parameter: this rank's partition
                out.append((f"{prefix}.{n}", t.to_local() if hasattr(t, "to_local") else t))
        return out

    # ------------------------------------------------------------------ shared helpers
    def make_grad_scaler(self, cls=None):
        """A torch grad scaler for DDP/FSDP: enabled for fp16 only, with ``train.loss_scale_init`` /
        ``train.loss_scale_window`` (halved on every inf/NaN gradient, doubled after that many finite steps)."""
        t = self.cfg.train
        return (cls or torch.amp.GradScaler)(self.device.type, init_scale=float(t.loss_scale_init),
                                             growth_interval=int(t.loss_scale_window),
                                             enabled=(self.precision == "fp16"))

    def load_grad_scaler(self, scaler, saved: dict) -> None:
        """Restore the checkpoint's loss scale and growth count; the window stays ``train.loss_scale_window``.
        A checkpoint written without loss scaling (fp32/bf16) leaves an fp16 run at ``train.loss_scale_init``."""
        if scaler.is_enabled() and saved:
            scaler.load_state_dict({**saved, "growth_interval": int(self.cfg.train.loss_scale_window)})

    def scaled_step(self, scaler, optimizer) -> None:
        """``scaler.step`` then ``scaler.update``; sets ``step_skipped`` as torch documents it (the scale went
        down: an inf/NaN gradient was found and the optimiser step was skipped)."""
        if not scaler.is_enabled():
            optimizer.step()
            self.step_skipped = False
            return
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        self.step_skipped = scaler.get_scale() < before

    def clipped_step(self, lr: float, wd: float, freeze_last_layer: bool, norm: Optional[torch.Tensor] = None):
        """The torch engines' optimiser step: drop the frozen last layer's gradients (``self._last``), unscale
        (fp16), clip by ``norm`` (the global gradient norm, a device tensor; computed here when not given), set
        lr/wd, step, zero gradients. Returns the norm."""
        if freeze_last_layer:
            for p in self._last:
                p.grad = None
        self.scaler.unscale_(self.optimizer)
        if norm is None:
            norm = self.total_grad_norm()
        c = self.cfg.optim.clip_grad
        if c > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, c, norm)
        self.set_lr_wd(self.optimizer, lr, wd)
        self.scaled_step(self.scaler, self.optimizer)
        self.zero_grad()
        return norm

    def set_lr_wd(self, optimizer, lr: float, wd: float) -> None:
        for g in optimizer.param_groups:
            g["lr"] = lr
            if g.get("apply_wd", True):
                g["weight_decay"] = wd
            else:
                g["weight_decay"] = 0.0
