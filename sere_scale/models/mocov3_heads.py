"""MoCo v3's image-level heads on CLS: a projector (3-layer MLP) and a predictor (2-layer MLP).

As MoCo v3's ViT builder: every linear layer without bias; BatchNorm + ReLU after each hidden linear layer; a
BatchNorm without affine parameters after the last linear layer (SimCLR's design), in the projector and the
predictor alike. The BatchNorms are ``SyncTokenBatchNorm``: statistics all-reduced across data-parallel ranks.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sere_scale.models.heads import SyncTokenBatchNorm


def moco_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int,
             last_bn: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [SyncTokenBatchNorm(d_out), nn.ReLU()]
        elif last_bn:
            layers.append(SyncTokenBatchNorm(d_out, affine=False))
    return nn.Sequential(*layers)


class MoCoV3Head(nn.Module):
    """``forward(cls, predict)``: ``projector(cls)`` (teacher: the key k), or ``predictor(projector(cls))``
    with ``predict=True`` (student: the query q). Outputs are not L2-normalised (the loss does it)."""

    takes_predict = True  # SERENet passes its ``predict`` flag to this head

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__()
        self.projector = moco_mlp(3, in_dim, hidden_dim, out_dim)
        self.predictor = moco_mlp(2, out_dim, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor, predict: bool = True) -> torch.Tensor:
        z = self.projector(x)
        return self.predictor(z) if predict else z
