"""The teacher's targets: centering with a center updated once per optimiser step from an all-reduced batch mean
(DINO, iBOT), or Sinkhorn-Knopp (``centering: sinkhorn_knopp``, losses/sinkhorn.py), which keeps no center."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from sere_scale.losses.sinkhorn import sinkhorn_knopp


class CenteredTeacher(nn.Module):
    """Holds ``center`` (1, K) and accumulates teacher logits until ``update_center`` (once per optimiser
    step, also with gradient accumulation): center ← m·center + (1−m)·mean of every accumulated teacher
    logit row, all-reduced across ranks."""

    def __init__(self, out_dim: int, center_momentum: float, centering: str = "center", sinkhorn_iterations: int = 3):
        super().__init__()
        if centering not in ("center", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'center' or 'sinkhorn_knopp', got {centering!r}")
        self.register_buffer("center", torch.zeros(1, out_dim))  # kept (unused) under Sinkhorn-Knopp: same state
        self.momentum = center_momentum
        self.sinkhorn = centering == "sinkhorn_knopp"
        self.sinkhorn_iterations = sinkhorn_iterations
        self._sum = None
        self._count = 0

    @torch.no_grad()
    def accumulate(self, teacher_logits: torch.Tensor) -> None:
        if self.sinkhorn:
            return
        t = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        s = t.sum(0, keepdim=True)
        self._sum = s if self._sum is None else self._sum + s
        self._count += t.shape[0]

    @torch.no_grad()
    def update_center(self) -> None:
        if self._sum is None:
            return
        stats = torch.cat([self._sum.flatten(), self._sum.new_tensor([float(self._count)])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        mean = (stats[:-1] / stats[-1]).view_as(self.center)
        self.center.mul_(self.momentum).add_(mean, alpha=1 - self.momentum)
        self.discard_pending()

    def discard_pending(self) -> None:
        """Forget the teacher logits accumulated since the last ``update_center`` (a skipped step's)."""
        self._sum, self._count = None, 0

    def teacher_probs(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Targets for (..., K) logits: the centred, sharpened softmax, or Sinkhorn-Knopp over every row given
        here and on the other ranks (a collective then)."""
        if self.sinkhorn:
            flat = teacher_logits.reshape(-1, teacher_logits.shape[-1])
            return sinkhorn_knopp(flat, temp, self.sinkhorn_iterations).view(teacher_logits.shape)
        return torch.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
