"""The contract between a network and the engines: what an engine may know of the model it parallelises.

A network exposes ``parallel_plan() -> ParallelPlan``; engines (``engine/``) use only this, never the model's
attribute names:

* ``blocks``: the repeated transformer blocks, in order: each is compiled (``engine.compile``) and is one FSDP2
  shard unit; activation checkpointing works per block.
* ``heads``: the output heads, each its own FSDP2 shard unit; they keep fp32 parameters under mixed precision
  (their BatchNorm statistics and the losses stay fp32).
* the root (everything else: patch embedding, tokens, final norm) is the last shard unit: the network itself.
* ``frozen_early``: parameter-name fragments of the parameters frozen for the first ``optim.freeze_last_layer``
  epochs (a parameter is frozen early if its name, as ``named_parameters`` of the unwrapped network gives it,
  contains one of them); ``is_frozen_early(name)`` applies the rule.
* ``set_activation_checkpointing(on)``: switches per-block activation checkpointing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ParallelPlan:
    blocks: tuple[nn.Module, ...]
    heads: tuple[nn.Module, ...]
    frozen_early: tuple[str, ...]
    set_activation_checkpointing: Callable[[bool], None]

    def is_frozen_early(self, name: str) -> bool:
        return any(f in name for f in self.frozen_early)
