"""Teacher centering with a center updated once per optimiser step from an all-reduced batch mean."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class CenteredTeacher(nn.Module):
    """Holds ``center`` (1, K) and accumulates teacher logits until ``update_center`` (once per optimiser
    step, also with gradient accumulation): center ← m·center + (1−m)·mean of every accumulated teacher
    logit row, all-reduced across ranks."""

    def __init__(self, out_dim: int, center_momentum: float):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.momentum = center_momentum
        self._sum = None
        self._count = 0

    @torch.no_grad()
    def accumulate(self, teacher_logits: torch.Tensor) -> None:
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
        return torch.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
