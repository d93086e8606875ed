"""DINO's image-level loss on CLS: cross-entropy between centred, sharpened teacher and student softmaxes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sere_scale.losses.centering import CenteredTeacher


class DINOLoss(CenteredTeacher):
    """Pairs: teacher global view q × student view v ≠ q; mean over pairs of the batch-mean CE."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "center", sinkhorn_iterations: int = 3):
        super().__init__(out_dim, center_momentum, centering, sinkhorn_iterations)
        self.student_temp = student_temp

    def forward(self, student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                teacher_temp: float) -> tuple[torch.Tensor, dict]:
        """``student_logits``: one (B, K) per view (globals first); ``teacher_logits``: one per global view."""
        # one call over every global view: Sinkhorn-Knopp balances the prototypes over all of them (as dinov2)
        t_probs = self.teacher_probs(torch.cat(teacher_logits), teacher_temp).split(
            [t.shape[0] for t in teacher_logits])
        s_logp = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student_logits]
        total, n = 0.0, 0
        for q, pt in enumerate(t_probs):
            for v, ls in enumerate(s_logp):
                if v == q:
                    continue
                total = total + (-(pt * ls).sum(-1)).mean()
                n += 1
        self.accumulate(torch.cat(teacher_logits))
        with torch.no_grad():
            p = torch.cat(t_probs)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        return total / max(n, 1), {"teacher_entropy": entropy}
