"""KoLeo regulariser (Sablayrolles et al., "Spreading vectors for similarity search"; dinov2's ``koleo_loss_weight``):
a collapse guard that spreads the student's CLS features within each batch. For L2-normalised features x_i,
loss = −mean_i log(‖x_i − x_nn(i)‖ + ε), nn(i) the nearest other sample (largest inner product) of the same
rank's batch; the distance is ``torch.nn.PairwiseDistance``'s (ε = 1e-8 added to the difference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``features``: (B, D) with B >= 2, computed in float32 whatever the autocast dtype."""
    if features.shape[0] < 2:
        raise ValueError(f"KoLeo needs at least 2 samples per batch and view, got {features.shape[0]}")
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine: a sample is never its own neighbour
            nn_idx = dots.argmax(dim=1)
        dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
        return -torch.log(dist + eps).mean()
