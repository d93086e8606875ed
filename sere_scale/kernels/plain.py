"""Reference implementation of the relation cross-entropy: materialises the (G, R, R) logits."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def relation_ce_rows(student: torch.Tensor, teacher: torch.Tensor, student_scale: float,
                     teacher_scale: float) -> torch.Tensor:
    """Per-group mean over rows of CE(softmax(teacher row), softmax(student row)); returns (G,) in fp32
    (autocast is switched off so the logits stay fp32)."""
    with torch.autocast(student.device.type, enabled=False):
        s = student.float()
        t = teacher.detach().float()
        s_logits = torch.bmm(s, s.transpose(1, 2)) * student_scale
        with torch.no_grad():
            p_t = F.softmax(torch.bmm(t, t.transpose(1, 2)) * teacher_scale, dim=-1)
        ce = -(p_t * F.log_softmax(s_logits, dim=-1)).sum(-1)  # (G, R)
        return ce.mean(-1)


def weighted_mean(per_group: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    if weights is None:
        return per_group.mean()
    w = weights.to(per_group.dtype)
    return (per_group * w).sum() / w.sum().clamp_min(1e-12)
