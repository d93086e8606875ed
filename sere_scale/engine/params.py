"""Optimiser parameter groups and parameter-name rules shared by every engine."""
from __future__ import annotations

import torch.nn as nn


def is_regularized(name: str, p) -> bool:
    """Weight decay applies to weights only: none on biases, norms and other 1-D parameters (upstream iBOT)."""
    return not (name.endswith(".bias") or p.ndim <= 1)


def param_groups(model: nn.Module) -> list[dict]:
    reg, noreg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (reg if is_regularized(name, p) else noreg).append(p)
    return [{"params": reg, "apply_wd": True}, {"params": noreg, "apply_wd": False, "weight_decay": 0.0}]


def last_layer_params(model: nn.Module) -> list:
    """Parameters of the image head's last layer, frozen for the first ``optim.freeze_last_layer`` epochs."""
    return [p for n, p in model.named_parameters() if "image_head.last_layer" in n and p.requires_grad]
