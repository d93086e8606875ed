"""Heads: DINO/iBOT projection head, and SERE's projection h and prediction g with synchronised BatchNorm."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from sere_scale.engine.distributed import differentiable_all_reduce


class WeightNormLinear(nn.Module):
    """Linear layer with weight ``g * v / ||v||`` per output row, no bias (DINO's last layer).

    The published head is ``weight_norm(nn.Linear(in, out, bias=False))`` (norm per output row, dim=0) with
    g filled with 1; with ``norm=True`` g stays fixed at 1 (DINO's ``norm_last_layer``), so it is left out.
    v keeps ``nn.Linear``'s default initialisation (kaiming-uniform, a=√5: U(±1/√in)): the published head builds
    this layer after the truncated-normal initialisation of its MLP.
    """

    def __init__(self, in_dim: int, out_dim: int, norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear.reset_parameters
        self.weight_g = None if norm else nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x):
        w = F.normalize(self.weight_v, dim=1)
        if self.weight_g is not None:
            w = w * self.weight_g
        return F.linear(x, w.to(x.dtype))


class DINOHead(nn.Module):
    """3-layer MLP (GELU) → bottleneck → L2 normalise → weight-normalised linear to K prototypes. ``use_bn``
    (DINO's ``use_bn_in_head``, iBOT's ``use_bn``): a BatchNorm after each hidden linear layer, over every token
    given (iBOT's CLS and patch tokens together), its statistics all-reduced across ranks (``SyncTokenBatchNorm``,
    as DINO converts it to ``SyncBatchNorm``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()

        def bn() -> list:
            return [SyncTokenBatchNorm(hidden_dim)] if use_bn else []

        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), *bn(), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), *bn(), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, norm=norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


def _dp_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class SyncTokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over channels of (..., C) tokens, with statistics all-reduced across data-parallel ranks.

    Works on any device and backend (gloo included), unlike ``nn.SyncBatchNorm``; the reduction is
    differentiable, so gradients match a single-process BatchNorm over the global batch. Statistics in fp32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if not self.training or _dp_world() == 1:
            # fp32 statistics even when an engine stores the affine parameters in bf16/fp16 (DeepSpeed)
            w = self.weight.float() if self.weight is not None else None
            b = self.bias.float() if self.bias is not None else None
            y = F.batch_norm(x2.float(), self.running_mean, self.running_var, w, b,
                             self.training, self.momentum, self.eps)
            return y.to(x.dtype).reshape(shape)
        xf = x2.float()
        n = torch.tensor([xf.shape[0]], dtype=torch.float32, device=xf.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0), n])
        stats = differentiable_all_reduce(stats)
        C = shape[-1]
        count = stats[-1]
        mean = stats[:C] / count
        var = (stats[C:2 * C] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            if self.running_mean is not None:
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
                self.running_var.mul_(1 - self.momentum).add_(unbiased.detach(), alpha=self.momentum)
                self.num_batches_tracked += 1
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype).reshape(shape)


class ProjectionHead(nn.Module):
    """SERE's ``h``: BatchNorm over channels + ReLU, per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.bn = SyncTokenBatchNorm(dim)

    def forward(self, x):
        return F.relu(self.bn(x))


class PredictionHead(nn.Module):
    """SERE's ``g``: Linear(C, C, no bias) + BatchNorm + ReLU, per token (student side only in the loss)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim, bias=False)
        self.bn = SyncTokenBatchNorm(dim)

    def forward(self, x):
        return F.relu(self.bn(self.fc(x)))


class RelationHeads(nn.Module):
    """One (h_p, g_p, h_c, g_c) set. ``forward(tokens, predict)`` → (spatial tokens, channel tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj_p, self.pred_p = ProjectionHead(dim), PredictionHead(dim)
        self.proj_c, self.pred_c = ProjectionHead(dim), PredictionHead(dim)

    def forward(self, tokens: torch.Tensor, predict: bool):
        sp, ch = self.proj_p(tokens), self.proj_c(tokens)
        if predict:
            sp, ch = self.pred_p(sp), self.pred_c(ch)
        return sp, ch
