"""iBOT's masked-image-modelling loss: per-patch CE on masked patches, teacher q vs student q."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sere_scale.losses.centering import CenteredTeacher


class IBOTPatchLoss(CenteredTeacher):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__(out_dim, center_momentum)
        self.student_temp = student_temp

    def forward(self, student_patch: list[torch.Tensor], teacher_patch: list[torch.Tensor],
                masks: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """Per global view: (B, N, K) student/teacher logits and a (B, N) bool mask. For each image the CE is
        averaged over its masked patches (0 when none), then over images, then over views."""
        total = 0.0
        for s, t, m in zip(student_patch, teacher_patch, masks):
            pt = self.teacher_probs(t, teacher_temp)
            ce = -(pt * F.log_softmax(s.float() / self.student_temp, dim=-1)).sum(-1)  # (B, N)
            m = m.float()
            total = total + ((ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()
        self.accumulate(torch.cat(teacher_patch))
        return total / max(len(student_patch), 1)
