"""Deterministic, resumable distributed sampler: every rank gets the same number of steps per epoch."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Shuffles with (seed, epoch), drops the tail so each rank gets ``len(self)`` indices, and can start
    ``start_batch`` batches into the epoch (for exact resume)."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if n < batch_size * world_size:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_size} x {world_size} ranks)")
        self.n, self.bs, self.rank, self.world, self.seed, self.shuffle = n, batch_size, rank, world_size, seed, shuffle
        self.epoch, self.start_batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.bs * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        per_rank = self.batches_per_epoch * self.bs
        order = order[: per_rank * self.world]
        mine = order[self.rank::self.world]
        return mine[self.start_batch * self.bs:]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.bs
