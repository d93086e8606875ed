"""MoCo v3's image-level loss: InfoNCE between the student's queries and the teacher's keys of another view,
with the keys of every data-parallel rank as negatives.

``ctr(q, k) = CE(q̂ · k̂_allᵀ / τ, label = own index + rank·B) · 2τ``, q̂ and k̂ L2-normalised, ``k_all`` the keys
of all ranks in rank order (gathered without gradient). With two global views and no local view the loss is
MoCo v3's ``ctr(q1, k2) + ctr(q2, k1)``. Local views (our choice; MoCo v3 has none): each student local query
is contrasted with every teacher global key too, and the loss is ``2 × mean over pairs`` (teacher global g ×
student view v ≠ g), which is the same sum for two globals and keeps the scale when locals are added.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _world_rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(keys of every rank concatenated in rank order, no gradient; label offset rank·B of this rank's rows).
    Every rank must hold the same number of keys."""
    k = k.detach().contiguous()
    world, rank = _world_rank()
    if world == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(world)]
    dist.all_gather(parts, k)
    return torch.cat(parts), rank * k.shape[0]


def contrastive_loss(q: torch.Tensor, k_all: torch.Tensor, offset: int, temperature: float):
    """(``CE(q̂ k_allᵀ / τ, arange(B) + offset) · 2τ``, fraction of queries whose own key scores highest).
    ``q`` (B, D) unnormalised; ``k_all`` (N, D) already L2-normalised. The logits and the softmax are fp32, under
    autocast too (autocast would run the matmul in bf16/fp16)."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        logits = q @ k_all.float().T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + offset
    loss = F.cross_entropy(logits, labels) * (2 * temperature)
    with torch.no_grad():
        acc = (logits.argmax(1) == labels).float().mean()
    return loss, acc


class MoCoV3Loss(nn.Module):
    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_q: list[torch.Tensor], teacher_k: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """``student_q``: (B, D) per student view (globals first); ``teacher_k``: (B, D) per teacher global
        view.
        Returns the loss and ``{"acc": top-1 contrastive accuracy, "loss_norm": mean CE / ln(#keys)}``."""
        keys = [gather_keys(F.normalize(k.float(), dim=1)) for k in teacher_k]
        total, accs, n = 0.0, [], 0
        for g, (k_all, offset) in enumerate(keys):
            for v, q in enumerate(student_q):
                if v == g:
                    continue
                loss, acc = contrastive_loss(q, k_all, offset, self.temperature)
                total = total + loss
                accs.append(acc)
                n += 1
        loss = 2 * total / max(n, 1)
        with torch.no_grad():
            n_keys = keys[0][0].shape[0]
            norm = (loss.detach() / 2) / (2 * self.temperature) / math.log(max(n_keys, 2))
        return loss, {"acc": torch.stack(accs).mean(), "loss_norm": norm}
