"""Optimiser parameter groups and parameter-name rules shared by every engine."""
from __future__ import annotations

import torch.nn as nn


def is_regularized(name: str, p) -> bool:
    """Weight decay applies to weights only: none on biases, norms and other 1-D parameters (upstream iBOT)."""
    return not (name.endswith(".bias") or p.ndim <= 1)


def param_groups(model: nn.Module, split_last_layer: bool = False) -> list[dict]:
    """Decayed and non-decayed groups (``apply_wd``). With ``split_last_layer`` the parameters frozen early (the
    image head's last layer) get their own group (``last_layer: True``), for engines that cannot drop its
    gradients while it is frozen (DeepSpeed: its groups are flattened buffers); empty groups are then left
    out."""
    is_last_layer = model.parallel_plan().is_frozen_early
    reg, noreg, last = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if split_last_layer and is_last_layer(name):
            last.append(p)
        else:
            (reg if is_regularized(name, p) else noreg).append(p)
    groups = [{"params": reg, "apply_wd": True}, {"params": noreg, "apply_wd": False, "weight_decay": 0.0}]
    if not split_last_layer:
        return groups
    if any(not is_regularized(n, p) for n, p in model.named_parameters() if is_last_layer(n)):
        raise ValueError("the last layer's parameters are expected to be decayed weights")
    groups.append({"params": last, "apply_wd": True, "last_layer": True})
    return [g for g in groups if g["params"]]


def last_layer_params(model: nn.Module) -> list:
    """The trainable parameters frozen for the first ``optim.freeze_last_layer`` epochs (the network's plan)."""
    is_last_layer = model.parallel_plan().is_frozen_early
    return [p for n, p in model.named_parameters() if is_last_layer(n) and p.requires_grad]
