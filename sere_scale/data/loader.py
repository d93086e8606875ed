"""Training loaders behind one interface used by the trainer (``run/trainer.py``).

A loader exposes ``batches_per_epoch`` (steps each rank gets per epoch, equal on every rank) and
``epoch_iter(epoch, start_batch)`` yielding collated batches (see ``transform.collate_ssl``) from batch
``start_batch`` of ``epoch`` on. The training loop stores (epoch, batch) in the checkpoint; resuming calls
``epoch_iter(epoch, batch)``, so no sample of the epoch is seen twice or skipped. Loader workers start once per
run and serve every epoch (``workers.py``; docs/DATA.md, "Loader workers").
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sere_scale.data.folder import ImageFolderSSL
from sere_scale.data.sampler import ResumableDistributedSampler
from sere_scale.data.transform import SSLTransform, collate_ssl
from sere_scale.data.worker_signals import job_signals_held
from sere_scale.data.workers import DEFAULT_TIMEOUT_S, Workers


class _EpochIndexed(Dataset):
    """Item ``(epoch, i)``: item ``i`` of ``dataset`` under epoch ``epoch``'s augmentation seed. Persistent
    workers hold their own copy of the dataset, so the epoch travels with each index, not by ``set_epoch``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


class _EpochSampler(Sampler):
    """``(epoch, index)`` for each index of a ``ResumableDistributedSampler`` at its current epoch and start."""

    def __init__(self, sampler: ResumableDistributedSampler):
        self.sampler = sampler

    def __iter__(self):
        epoch = self.sampler.epoch
        return ((epoch, i) for i in self.sampler.indices())

    def __len__(self) -> int:
        return len(self.sampler)


class FolderLoader:
    def __init__(self, root: str, transform, batch_size: int, rank: int, world_size: int, seed: int,
                 num_workers: int, encoded: bool = False, worker_timeout_s: float = DEFAULT_TIMEOUT_S):
        self.collate = collate_ssl
        if encoded:  # data.augment=gpu: ship file bytes, the device decodes and crops (encoded.py)
            from sere_scale.data.encoded import EncodedImageFolder, collate_encoded
            self.dataset, self.collate = EncodedImageFolder(root, transform, seed=seed), collate_encoded
        else:
            self.dataset = ImageFolderSSL(root, transform, seed=seed)
        self.sampler = ResumableDistributedSampler(len(self.dataset), batch_size, rank, world_size, seed)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.workers = Workers(num_workers, worker_timeout_s, f"image folder '{root}' (rank {rank})")
        self._dl = None

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def _loader(self) -> DataLoader:
        """One DataLoader for the run: its workers start on the first epoch and serve every later one."""
        if self._dl is None:
            # A private generator keeps the DataLoader from drawing on the global RNG (exact resume); the
            # workers' own seeds do not matter: each sample's augmentation is seeded by (seed, epoch, index).
            g = torch.Generator().manual_seed(self.seed)
            self._dl = DataLoader(_EpochIndexed(self.dataset), batch_size=self.batch_size,
                                  sampler=_EpochSampler(self.sampler), collate_fn=self.collate, drop_last=True,
                                  generator=g, **self.workers.kwargs())
        return self._dl

    def close(self) -> None:
        """Stop the workers now (else they stop when the loader is garbage-collected or the process exits)."""
        self._dl = None

    def epoch_iter(self, epoch: int, start_batch: int = 0):
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch, start_batch)
        with job_signals_held():  # workers (and the forkserver, on first use) are born deaf to the job's signals
            it = iter(self._loader())
        return self._counted(it, epoch, start_batch)

    def _counted(self, it, epoch: int, batch: int):
        pos = [batch]
        for item in self.workers.guard(it, lambda: f"batch {pos[0]} of epoch {epoch}"):
            pos[0] += 1
            yield item


def build_train_loader(cfg, rank: int = 0, world_size: int = 1):
    d = cfg.data
    gpu = d.augment == "gpu"
    if gpu:
        from sere_scale.data.encoded import EncodedSSLTransform
        transform = EncodedSSLTransform.from_config(cfg)
    else:
        transform = SSLTransform.from_config(cfg)
    if d.shards:  # WebDataset streaming; with augment=gpu it ships the stored bytes (collate_encoded batches)
        from sere_scale.data.shards import ShardLoader
        return ShardLoader(d.shards, transform, d.batch_size, rank, world_size, cfg.train.seed, d.num_workers,
                           worker_timeout_s=d.worker_timeout_s)
    if not d.path:
        from sere_scale.config.load import ConfigError
        raise ConfigError("config key 'data.path': set an image folder (or 'data.shards')")
    return FolderLoader(d.path, transform, d.batch_size, rank, world_size, cfg.train.seed, d.num_workers,
                        encoded=gpu, worker_timeout_s=d.worker_timeout_s)
