"""SERE's self-relation losses (METHOD.md Equ. 2-5), both through ``relation_cross_entropy``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from sere_scale.geometry.boxes import overlap_boxes, region_aligned_sample
from sere_scale.kernels import relation_cross_entropy


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) tokens → (B, C, h, w) feature map."""
    B, N, C = tokens.shape
    h, w = grid
    return tokens.transpose(1, 2).reshape(B, C, h, w)


class SpatialRelationLoss(nn.Module):
    """Pairs: teacher global q × student global v ≠ q (S = size_global) and × every student local view
    (S = size_local). Non-overlapping (pair, image) entries get weight 0; the loss is the weighted mean over
    valid (pair, image) entries of the mean over heads and rows."""

    def __init__(self, heads: int, size_global: int = 13, size_local: int = 6, teacher_tau: float = 0.5,
                 student_tau: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.heads, self.size_global, self.size_local = heads, size_global, size_local
        self.teacher_tau, self.student_tau, self.impl = teacher_tau, student_tau, impl

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, C, S, _ = x.shape
        M = self.heads
        return x.reshape(B, M, C // M, S * S).transpose(2, 3).reshape(B * M, S * S, C // M)

    def forward(self, teacher_maps: list[torch.Tensor], student_maps: list[torch.Tensor], boxes: torch.Tensor,
                flips: torch.Tensor, n_global: int) -> tuple[torch.Tensor, dict]:
        """``teacher_maps``: (B, C, h, w) per global view; ``student_maps``: per view (globals first);
        ``boxes`` (B, V, 4), ``flips`` (B, V)."""
        C = teacher_maps[0].shape[1]
        if C % self.heads:
            raise ValueError(f"sere.heads={self.heads} does not divide the channel count {C}")
        d = C // self.heads
        sums, weights = [], []
        for kind in ("global", "local"):
            S = self.size_global if kind == "global" else self.size_local
            s_list, t_list, w_list = [], [], []
            for q in range(n_global):
                views = range(n_global) if kind == "global" else range(n_global, len(student_maps))
                for v in views:
                    if v == q:
                        continue
                    region, valid = overlap_boxes(boxes[:, q], boxes[:, v])
                    t = region_aligned_sample(teacher_maps[q], boxes[:, q], flips[:, q], region, S)
                    s = region_aligned_sample(student_maps[v], boxes[:, v], flips[:, v], region, S)
                    t_list.append(self._split_heads(t))
                    s_list.append(self._split_heads(s))
                    w_list.append(valid.float().repeat_interleave(self.heads))
            if not s_list:
                continue
            w = torch.cat(w_list)
            wsum = w.sum()
            loss = relation_cross_entropy(torch.cat(s_list), torch.cat(t_list),
                                          1.0 / (math.sqrt(d) * self.student_tau),
                                          1.0 / (math.sqrt(d) * self.teacher_tau), weights=w, impl=self.impl)
            sums.append(loss * wsum)
            weights.append(wsum)
        if not sums:
            z = student_maps[0].sum() * 0.0
            return z, {"overlap_frac": z.detach()}
        total_w = torch.stack(weights).sum()
        loss = torch.stack(sums).sum() / total_w.clamp_min(1e-12)
        n_pairs = sum(1 for q in range(n_global) for v in range(len(student_maps)) if v != q)
        frac = total_w / (n_pairs * self.heads * boxes.shape[0])
        return loss, {"overlap_frac": frac.detach()}


class ChannelRelationLoss(nn.Module):
    """Pairs: teacher global q × every student view v ≠ q; relation over channels, D = tokens of the view,
    scale 1/(N·tau); mean over pairs of the mean over batch and rows."""

    def __init__(self, teacher_tau: float = 0.1, student_tau: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.teacher_tau, self.student_tau, self.impl = teacher_tau, student_tau, impl

    def forward(self, teacher_tokens: list[torch.Tensor], student_tokens: list[torch.Tensor]) -> torch.Tensor:
        """``teacher_tokens``: (B, N_q, C) per global view; ``student_tokens``: (B, N_v, C) per view."""
        total, n = 0.0, 0
        for q, t in enumerate(teacher_tokens):
            tt = t.transpose(1, 2)  # (B, C, N_q)
            for v, s in enumerate(student_tokens):
                if v == q:
                    continue
                ss = s.transpose(1, 2)
                total = total + relation_cross_entropy(ss, tt, 1.0 / (ss.shape[2] * self.student_tau),
                                                       1.0 / (tt.shape[2] * self.teacher_tau), impl=self.impl)
                n += 1
        return total / max(n, 1)
