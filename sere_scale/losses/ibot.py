"""iBOT's masked-image-modelling loss: per-patch CE on masked patches, teacher q vs student q."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sere_scale.losses.centering import CenteredTeacher


class IBOTPatchLoss(CenteredTeacher):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3):
        super().__init__(out_dim, center_momentum, centering, sinkhorn_iterations)
        self.student_temp = student_temp

    def forward(self, student_patch: list[torch.Tensor], teacher_patch: list[torch.Tensor],
                masks: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """Per global view: (B, N, K) student/teacher logits and a (B, N) bool mask. For each image the CE is
        averaged over its masked patches (0 when none), then over images, then over views."""
        total = 0.0
        targets = self._targets(teacher_patch, masks, teacher_temp)
        for s, pt, m in zip(student_patch, targets, masks):
            ce = -(pt * F.log_softmax(s.float() / self.student_temp, dim=-1)).sum(-1)  # (B, N)
            m = m.float()
            total = total + ((ce * m).sum(-1) / m.sum(-1).clamp_min(1.0)).mean()
        self.accumulate(torch.cat(teacher_patch))
        return total / max(len(student_patch), 1)

    def _targets(self, teacher_patch, masks, temp) -> list[torch.Tensor]:
        """Per view (B, N, K) targets. Sinkhorn-Knopp balances the masked patches of every view and rank
        together (the only ones scored, as dinov2); the others are left 0."""
        if not self.sinkhorn:
            return [self.teacher_probs(t, temp) for t in teacher_patch]
        masks = [m.bool() for m in masks]
        rows = self.teacher_probs(torch.cat([t[m] for t, m in zip(teacher_patch, masks)]), temp)
        out = []
        for t, m, r in zip(teacher_patch, masks, rows.split([int(m.sum()) for m in masks])):
            pt = t.new_zeros(t.shape, dtype=torch.float32)
            pt[m] = r
            out.append(pt)
        return out
