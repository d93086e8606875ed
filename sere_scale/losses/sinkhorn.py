"""Sinkhorn-Knopp teacher targets (SwAV; dinov2's ``centering: sinkhorn_knopp``), a collapse guard in place of the
running center: the teacher's softmax over the K prototypes is rebalanced so that, over the whole global batch
(every rank), each prototype receives an equal share of the B samples while each sample keeps a distribution.

From the published algorithm: Q = exp(logits / T)ᵀ (K × B); Q /= ΣQ; then ``n_iterations`` times: each row
divided by its sum and by K (prototypes equipartitioned), each column divided by its sum and by B (samples);
finally Q·B, so that each sample's column sums to 1. Sums run over all ranks (all-reduced), B is the global
number of rows. The logits are shifted by their global maximum before the exponential (a common factor that the
normalisations remove) so that large logits (``norm_last_layer: false``) cannot overflow."""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """``logits``: (B_local, K) teacher logits of this rank (any float dtype). Returns (B_local, K) float32
    targets, each row summing to 1. Collective: every rank must call it (a rank with no rows passes a (0, K)
    tensor)."""
    x = logits.detach().float()
    k = x.shape[-1]
    top = x.max() if x.numel() else x.new_tensor(float("-inf"))
    top = _all_reduce(top.reshape(1).clone(), dist.ReduceOp.MAX if dist.is_available() else None)
    q = torch.exp((x - top) / temp).t()  # (K, B_local)
    stats = torch.cat([q.sum().reshape(1), q.new_tensor([float(q.shape[1])])])
    total, b = _all_reduce(stats).unbind()
    q /= total
    for _ in range(n_iterations):
        rows = _all_reduce(q.sum(dim=1, keepdim=True))
        q /= rows
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()
