"""The training step, defined once: the trainer, the profiler and ``benchmarks/`` all run ``train_step``.

One optimiser step = ``accum`` micro-batches (forward under autocast, backward under ``no_sync`` for all but
the last), the global gradient norm (a device tensor, ``engine.grad_norm``), one *vote* (every rank's finiteness
of its losses, the finiteness of the gradient norm and any rank's preemption flag: one all-reduce), then clip +
optimiser step, EMA teacher update and center update. A step whose vote finds a non-finite loss or gradient norm
is undone (gradients zeroed, pending center statistics dropped, BatchNorm buffers restored): nothing non-finite
is ever applied. Under fp16 the gradient's finiteness is the loss scaler's (its device-side skip, an overflow:
the teacher and centers are left alone too), not a non-finite step. What a non-finite step means for the run
(stop or skip, counted) is the trainer's ``train.nonfinite`` policy (``trainer.py``, ``nonfinite.py``).

Host synchronisation: the vote's ``tolist()`` is the only one a non-logging step makes (documented in
docs/ARCHITECTURE.md, counted by tests/test_host_sync.py); it is taken after the last backward, once the gradient
norm is known. Engines whose backward must not run on a non-finite loss (``check_every_micro_batch``: DeepSpeed,
whose backward counts micro-steps and reduces gradients at the accumulation boundary) vote on the losses before
every micro-batch's backward instead (``accum`` syncs per step) and skip a non-finite gradient norm inside their
optimiser step (ZeRO's own overflow check, ``engine.step_skipped``): outside fp16 that is a non-finite step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from sere_scale.data.device import to_device
from sere_scale.engine.distributed import all_reduce_sum
from sere_scale.run.nonfinite import BufferSnapshot


def no_timer(name: str):
    return contextlib.nullcontext()


class Batches:
    """The data position of a run (``state["epoch"]``, ``state["batch"]``, shared with the checkpointed train
    state) and the loader's epoch iterator: hands out device-ready micro-batches, rolling over epochs."""

    def __init__(self, loader, state: dict, device, augment=None):
        self.loader, self.state, self.device, self.augment = loader, state, device, augment
        self.it = loader.epoch_iter(state["epoch"], state["batch"])

    def _new_epoch(self) -> None:
        self.state["epoch"] += 1
        self.state["batch"] = 0
        self.it = self.loader.epoch_iter(self.state["epoch"], 0)

    def next(self, timer=no_timer) -> dict:
        with timer("data_wait"):
            batch = next(self.it, None)
            if batch is None:  # end of the loader's epoch (every rank has the same number of batches)
                self._new_epoch()
                batch = next(self.it)
        position = (self.state["epoch"], self.state["batch"])
        self.state["batch"] += 1
        with timer("host_to_device"):  # + decode and multi-crop on the device with data.augment=gpu
            return to_device(batch, self.device, self.augment, position)

    def end_step(self, steps_per_epoch: int, accum: int) -> None:
        """After an optimiser step: the epoch ends after ``steps_per_epoch`` steps (the leftover
        ``batches % accum`` micro-batches are dropped)."""
        if self.state["batch"] >= steps_per_epoch * accum:
            self._new_epoch()


@dataclass
class StepResult:
    outs: list = field(default_factory=list)  # the method's outputs (device tensors), one per micro-batch run
    grad_norm: object = None                   # a tensor or float; None when no optimiser step was taken
    finite: bool = True                        # False: some rank's loss, or the gradient norm, was non-finite:
    #                                            the step was undone
    cause: str = ""                            # when not finite: "loss" or "gradient"
    overflow: bool = False                     # fp16: the loss scaler found inf/NaN gradients, no update
    preempted: bool = False                    # some rank was asked to stop (SIGTERM/SIGUSR1)
    n_corrupt: int = 0                         # corrupt images replaced in this rank's micro-batches
    data_wait_s: float = 0.0                   # host time spent waiting for the loader


class _Clock:
    """Adds the host time of the ``data_wait`` region to the result, then defers to the given timer."""

    def __init__(self, timer, res: StepResult):
        self.timer, self.res = timer, res

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        with self.timer(name):
            yield
        if name == "data_wait":
            self.res.data_wait_s += time.perf_counter() - t0


def _vote(ok: torch.Tensor, preempt: bool, world_size: int, grad_ok: torch.Tensor | None = None):
    """(all ranks' losses finite, gradient norm finite on all ranks, any rank preempted): one all-reduce, one
    host sync. ``grad_ok`` None: not checked here (True)."""
    g = ok.new_ones((), dtype=torch.float32) if grad_ok is None else grad_ok.float().reshape(())
    flags = torch.stack([ok.float(), g, ok.new_full((), float(preempt), dtype=torch.float32)])
    n_finite, n_grad, n_preempted = all_reduce_sum(flags).tolist()
    return n_finite == world_size, n_grad == world_size, n_preempted > 0


def _undo(engine, method, buffers: BufferSnapshot, res: StepResult, cause: str) -> StepResult:
    """A non-finite step: nothing of it is kept (gradients, pending center statistics, BatchNorm buffers)."""
    res.finite, res.cause = False, cause
    engine.zero_grad()
    method.discard_pending()
    buffers.restore()  # the step's forwards wrote into BatchNorm running stats: undo it
    return res


def train_step(engine, method, batches: Batches, sched: dict, accum: int, world_size: int,
               preempt_flag=lambda: False, timer=no_timer, freeze_last_layer: bool | None = None) -> StepResult:
    """One optimiser step (see the module docstring). ``sched``: this step's values from ``schedules.at``;
    ``preempt_flag``: read once per vote; ``timer``: a ``RegionTimer`` (the profiler) or nothing."""
    res = StepResult()
    clock = _Clock(timer, res)
    buffers = BufferSnapshot(engine)
    every = getattr(engine, "check_every_micro_batch", False)
    ok = None
    for k in range(accum):
        batch = batches.next(clock)
        res.n_corrupt += batch["n_corrupt"]  # a host int (no sync)
        with engine.no_sync(k < accum - 1):
            with engine.autocast():
                out = method(engine.student, engine.teacher, batch, sched)
            res.outs.append(out)
            fin = torch.isfinite(out["loss"].detach())
            ok = fin if ok is None else ok & fin
            if every:
                finite, _, preempted = _vote(ok, preempt_flag(), world_size)
                res.preempted |= preempted
                if not finite:
                    return _undo(engine, method, buffers, res, "loss")
            with timer("backward"):
                engine.backward(out["loss"] / accum)
    if freeze_last_layer is None:
        freeze_last_layer = sched["epoch"] < engine.cfg.optim.freeze_last_layer
    norm = None
    if not every:
        with timer("optimizer"):
            norm = engine.grad_norm(freeze_last_layer)  # None under fp16: the loss scaler checks
        finite, grad_finite, preempted = _vote(ok, preempt_flag(), world_size,
                                               None if norm is None else torch.isfinite(norm))
        res.preempted |= preempted
        if not (finite and grad_finite):
            res.grad_norm = norm  # logged: null when it is the non-finite one
            return _undo(engine, method, buffers, res, "loss" if not finite else "gradient")
    with timer("optimizer"):
        res.grad_norm = engine.step(sched["lr"], sched["wd"], freeze_last_layer, norm)
    if engine.step_skipped:
        if engine.precision != "fp16":
            # no loss scaler: the optimiser (ZeRO's overflow check) found a non-finite gradient norm and skipped
            return _undo(engine, method, buffers, res, "gradient")
        # fp16 overflow: the loss scaler skipped the optimiser step (and lowered the scale). Skipped as a whole,
        # as under train.nonfinite=skip: the teacher does not move, the centers ignore it.
        method.discard_pending()
        res.overflow = True
        return res
    with timer("ema"):
        engine.ema_update(sched["momentum"])
        method.after_step()
    return res


def first_nonfinite(res: StepResult) -> dict:
    """The output of the first micro-batch whose loss is not finite (the last one when none is on this rank)."""
    return next((o for o in res.outs if not torch.isfinite(o["loss"].detach())), res.outs[-1])
