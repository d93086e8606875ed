"""Training loaders behind one interface used by ``train.py``.

A loader exposes ``batches_per_epoch`` (steps each rank gets per epoch, equal on every rank) and
``epoch_iter(epoch, start_batch)`` yielding collated batches (see ``transform.collate_ssl``) from batch
``start_batch`` of ``epoch`` on. The training loop stores (epoch, batch) in the checkpoint; resuming calls
``epoch_iter(epoch, batch)``, so no sample of the epoch is seen twice or skipped.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .folder import ImageFolderSSL
from .sampler import ResumableDistributedSampler
from .transform import SSLTransform, collate_ssl
from .worker_signals import job_signals_held, worker_init


class FolderLoader:
    def __init__(self, root: str, transform, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, encoded: bool = False):
        self.collate = collate_ssl
        if encoded:  # data.augment=gpu: ship file bytes, the device decodes and crops (encoded.py)
            from .encoded import EncodedImageFolder, collate_encoded
            self.dataset, self.collate = EncodedImageFolder(root, transform, seed=seed), collate_encoded
        else:
            self.dataset = ImageFolderSSL(root, transform, seed=seed)
        self.sampler = ResumableDistributedSampler(len(self.dataset), batch_size, rank, world_size, seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def epoch_iter(self, epoch: int, start_batch: int = 0):
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        # A private generator keeps the DataLoader from drawing on the global RNG (exact resume).
        g = torch.Generator().manual_seed(self.seed + epoch)
        dl = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                        num_workers=self.num_workers, collate_fn=self.collate, drop_last=True,
                        persistent_workers=False, generator=g, worker_init_fn=worker_init,
                        multiprocessing_context="fork" if self.num_workers > 0 else None)
        with job_signals_held():  # workers are born deaf to the job's signals
            return iter(dl)


def build_train_loader(cfg, rank: int = 0, world_size: int = 1):
    d = cfg.data
    gpu = d.augment == "gpu"
    if gpu:
        from .encoded import EncodedSSLTransform
        transform = EncodedSSLTransform.from_config(cfg)
    else:
        transform = SSLTransform.from_config(cfg)
    if d.shards:  # WebDataset streaming; with augment=gpu it ships the stored bytes (collate_encoded batches)
        from .shards import ShardLoader
        return ShardLoader(d.shards, transform, d.batch_size, rank, world_size, cfg.train.seed, d.num_workers)
    if not d.path:
        from ..config import ConfigError
        raise ConfigError("config key 'data.path': set an image folder (or 'data.shards')")
    return FolderLoader(d.path, transform, d.batch_size, rank, world_size, cfg.train.seed, d.num_workers,
                        encoded=gpu)
