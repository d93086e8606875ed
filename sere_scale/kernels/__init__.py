"""Self-relation cross-entropy, the one operation behind both SERE losses.

``relation_cross_entropy(student, teacher, student_scale, teacher_scale, weights=None, impl="auto")``

* ``student``: (G, R, Ds), ``teacher``: (G, R, Dt) (Ds and Dt may differ: the channel relation of a local view
  has fewer tokens than the teacher's global view).
* logits ``scale * x xᵀ`` (G, R, R); returns the mean over G×R of CE(softmax(teacher row), softmax(student row)),
  or, with ``weights`` (G,), the weighted mean over groups of the per-group row mean.
* gradient flows to ``student`` only; all softmaxes are evaluated in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch

from .plain import relation_cross_entropy_plain

IMPLS = ("auto", "plain")


def relation_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, student_scale: float,
                           teacher_scale: float, weights: Optional[torch.Tensor] = None,
                           impl: str = "auto") -> torch.Tensor:
    if student.dim() != 3 or teacher.dim() != 3:
        raise ValueError(f"relation_cross_entropy expects (G, R, D) inputs, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student and teacher must agree on (G, R): {tuple(student.shape[:2])} vs "
                         f"{tuple(teacher.shape[:2])}")
    if weights is not None and weights.shape != (student.shape[0],):
        raise ValueError(f"weights must have shape (G,) = ({student.shape[0]},), got {tuple(weights.shape)}")
    if impl not in IMPLS:
        raise ValueError(f"unknown relation impl '{impl}', expected one of {IMPLS}")
    return relation_cross_entropy_plain(student, teacher, student_scale, teacher_scale, weights)


__all__ = ["relation_cross_entropy", "IMPLS"]
