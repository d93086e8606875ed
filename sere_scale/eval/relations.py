"""SERE's self-relations of two views of one image, on the backbone's pre-norm patch features (METHOD.md).

* spatial: both views' feature maps are sampled on the S×S cell centres of their overlap region
  (``region_aligned_sample``), so element (i, j) of the two relations refers to the same image locations; per
  head m, ``A = softmax_rows(X_m X_mᵀ / sqrt(d) / tau_p)`` (B, M, S², S²);
* channel: over all tokens of each view, ``A = softmax_rows(cᵀ c / N / tau_c)`` (B, C, C).

The loss takes relations after the projection head h (BatchNorm + ReLU), which is not part of the backbone;
to make relations of different models comparable whatever their feature scale, ``standardize=True`` (default)
applies h with its parameters at their initial values (BatchNorm weight 1, bias 0): each channel is standardised
with one mean and variance, then ReLU. The BatchNorm's statistics at training time are batch statistics over
all images and views; here they are given (``stats``, e.g. over a whole evaluation set, see ``ChannelStats``)
or taken over both views of the images of the call. Both views share the statistics, so identical views keep
identical relations. ``standardize=False``: the raw pre-norm features.

Besides the softmax relations, ``two_view_relations`` returns their logits before the temperature (the
similarity scores), which ``row_corr_distance`` compares independently of how sharp the relations are.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from sere_scale.geometry.boxes import overlap_boxes, region_aligned_sample
from sere_scale.losses.sere import tokens_to_map


class ChannelStats:
    """Running per-channel mean and variance of (…, C) feature tokens (float64 sums)."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, None, None

    def update(self, tokens: torch.Tensor) -> None:
        t = tokens.detach().reshape(-1, tokens.shape[-1]).double().cpu()
        if self.sum is None:
            self.sum, self.sumsq = torch.zeros(t.shape[1], dtype=torch.float64), torch.zeros(t.shape[1],
                                                                                               dtype=torch.float64)
        self.n += t.shape[0]
        self.sum += t.sum(0)
        self.sumsq += (t * t).sum(0)

    def mean_std(self, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.n
        var = (self.sumsq / self.n - mean * mean).clamp_min(0)
        return mean.float(), (var + eps).sqrt().float()


def spatial_scores(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, C, S, S) sampled features → (B, M, S², S²) per-head similarities X_m X_mᵀ / sqrt(d)."""
    B, C, S, _ = x.shape
    if C % heads:
        raise ValueError(f"{heads} relation heads do not divide the channel count {C}")
    d = C // heads
    xm = x.reshape(B, heads, d, S * S).transpose(2, 3)  # (B, M, S², d)
    return xm @ xm.transpose(2, 3) / math.sqrt(d)


def channel_scores(tokens: torch.Tensor) -> torch.Tensor:
    """(B, N, C) tokens → (B, C, C) similarities cᵀc / N."""
    return tokens.transpose(1, 2) @ tokens / tokens.shape[1]


def spatial_relation(x: torch.Tensor, heads: int, tau: float) -> torch.Tensor:
    """(B, C, S, S) sampled features → (B, M, S², S²) per-head row-softmax relation."""
    return (spatial_scores(x, heads) / tau).softmax(dim=-1)


def channel_relation(tokens: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, N, C) tokens → (B, C, C) row-softmax of cᵀc / N / tau."""
    return (channel_scores(tokens) / tau).softmax(dim=-1)


def row_tv(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Total-variation distance between matching rows of two row-stochastic tensors: 0.5·Σ_j |a_ij − b_ij|,
    in [0, 1] (0: identical rows, 1: disjoint supports)."""
    return 0.5 * (a - b).abs().sum(dim=-1)


def row_corr_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """1 − Pearson correlation between matching rows of two (…, R, R) score matrices, over the off-diagonal
    entries (a row's diagonal entry is its own energy, shared by both views whatever they show), in float64.

    In [0, 2]: 0 when the rows agree up to a positive scale and offset — so it does not change with the
    temperature of a softmax over them (how sharp the relation is) — 1 for uncorrelated rows. ``eps`` keeps two
    constant rows at 0 and a constant row against a varying one near 1. R = 1 or 2 leaves < 2 entries: 0.
    """
    R = a.shape[-1]
    if R < 3:
        return torch.zeros(a.shape[:-1], dtype=torch.float64, device=a.device)
    off = ~torch.eye(R, dtype=torch.bool, device=a.device)
    x = a.double()[..., off].reshape(*a.shape[:-1], R - 1)
    y = b.double()[..., off].reshape(*b.shape[:-1], R - 1)
    x = x - x.mean(dim=-1, keepdim=True)
    y = y - y.mean(dim=-1, keepdim=True)
    r = ((x * y).sum(-1) + eps) / (((x * x).sum(-1) + eps) * ((y * y).sum(-1) + eps)).sqrt()
    return (1 - r).clamp(0, 2)


@torch.no_grad()
def view_tokens(backbone, crops: tuple[torch.Tensor, torch.Tensor]):
    """Pre-norm patch tokens (B, N, C) of two same-sized view batches, and the patch grid."""
    out = backbone(torch.cat(list(crops)))
    feats, B = out["pre"].float(), crops[0].shape[0]
    return feats[:B], feats[B:], out["grid"]


@torch.no_grad()
def two_view_relations(backbone, crops: tuple[torch.Tensor, torch.Tensor], boxes: torch.Tensor,
                       flips: torch.Tensor, size: int, heads: int, tau_p: float = 0.5, tau_c: float = 0.1,
                       standardize: bool = True,
                       stats: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> dict:
    """Relations of two same-sized views of a batch of images.

    ``crops``: two (B, 3, H, W) tensors; ``boxes`` (B, 2, 4) and ``flips`` (B, 2) follow the box contract;
    ``stats``: per-channel (mean, std) for ``standardize`` (default: over both views of these images).
    Returns the relations ``spatial`` (2, B, M, S², S²) and ``channel`` (2, B, C, C), their scores before the
    temperature ``spatial_scores`` and ``channel_scores`` (same shapes), ``region`` (B, 4) and ``valid`` (B,)
    (the views overlap).
    """
    t1, t2, grid = view_tokens(backbone, crops)
    if standardize:
        if stats is None:
            acc = ChannelStats()
            acc.update(torch.cat([t1, t2]))
            stats = acc.mean_std()
        mean, std = (s.to(t1.device) for s in stats)
        t1, t2 = ((t1 - mean) / std).relu(), ((t2 - mean) / std).relu()  # h at its initial parameters
    m1, m2 = tokens_to_map(t1, grid), tokens_to_map(t2, grid)
    region, valid = overlap_boxes(boxes[:, 0], boxes[:, 1])
    s1 = region_aligned_sample(m1, boxes[:, 0], flips[:, 0], region, size)
    s2 = region_aligned_sample(m2, boxes[:, 1], flips[:, 1], region, size)
    sp_s = torch.stack([spatial_scores(s1, heads), spatial_scores(s2, heads)])
    ch_s = torch.stack([channel_scores(t1), channel_scores(t2)])
    return {"spatial": (sp_s / tau_p).softmax(dim=-1), "channel": (ch_s / tau_c).softmax(dim=-1),
            "spatial_scores": sp_s, "channel_scores": ch_s, "region": region, "valid": valid}
