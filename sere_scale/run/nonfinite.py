"""``train.nonfinite``: what the training loop does when a loss is NaN/inf on any rank, or the global gradient norm
is (outside fp16, whose loss scaler skips such steps itself): a non-finite step, never applied (``run/step.py``).

- ``stop``: the state from before the failing step is checkpointed — the BatchNorm running statistics the
  failing forward already updated are restored from a snapshot taken before the step, the data position is that
  of the step's first micro-batch — unless this run's newest checkpoint is of that very step (then it *is* that
  state and is kept, never rewritten); exit code 3.
- ``skip``: the step is dropped (no update; buffers restored) but counts: it is logged (its non-finite losses as
  ``null``, ``"skipped": true``) and checkpointed like any other step. ``train.max_consecutive_skips`` skipped
  steps in a row mean the run diverged: it stops with exit code 3 (its newest checkpoint stays).
"""
from __future__ import annotations

import torch

from sere_scale.engine.checkpoint import read_meta


class NonFiniteLoss(RuntimeError):
    pass


def _modules(engine):
    """The student's and teacher's modules as every engine holds them (``student_module``/``teacher_module``: the
    callables ``student``/``teacher`` may be wrappers, e.g. DeepSpeed's or FSDP's resharding teacher). Buffers
    are never sharded (FSDP2 and ZeRO-3 partition parameters only): each rank restores its full copy."""
    for name in ("student_module", "teacher_module"):
        m = getattr(engine, name, None)
        if isinstance(m, torch.nn.Module):
            yield m


class BufferSnapshot:
    """Copies of the student's and teacher's buffers (BatchNorm running stats, ...), restorable in place, on
    every backend."""

    def __init__(self, engine):
        self.saved = [(b, b.detach().clone()) for m in _modules(engine) for b in m.buffers()]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)


def stop(cfg, engine, ckpt, state: dict, res, metrics) -> NonFiniteLoss:
    """Checkpoint the pre-step ``state`` (unless the newest checkpoint is of this step) and return the error.
    ``res``: the failing step's ``StepResult`` (its ``cause``: "loss" or "gradient")."""
    latest = ckpt.latest()
    if latest is not None and read_meta(latest).get("step") == state["step"]:
        saved = latest  # already the state from before this step: keep it as written
    else:
        saved = ckpt.save(engine, dict(state))
    out = next((o for o in res.outs if not torch.isfinite(o["loss"].detach())), res.outs[-1])
    parts = {k: float(v.detach()) for k, v in out.items() if k.startswith("loss")}
    what = (f"non-finite gradient norm ({float(res.grad_norm) if res.grad_norm is not None else 'inf/nan'})"
            if res.cause == "gradient" else "non-finite loss")
    metrics.close("nonfinite")
    return NonFiniteLoss(f"{what} at step {state['step'] + 1} (loss components: {parts}); not applied: the last "
                         f"good state (after step {state['step']}) is checkpointed at {saved}. Lower the lr, or set "
                         f"train.nonfinite=skip to skip such steps.")


def diverged(cfg, ckpt, n: int, step: int) -> NonFiniteLoss:
    return NonFiniteLoss(f"{n} consecutive steps had a non-finite loss (up to step {step}; "
                         f"train.max_consecutive_skips={cfg.train.max_consecutive_skips}): the run has diverged. "
                         f"Newest checkpoint: {ckpt.latest()}. Resume from an earlier checkpoint with a lower lr.")
