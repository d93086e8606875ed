"""Streaming multi-crop loader over WebDataset tar shards, with exact epochs and an exact resume position.

``ShardLoader(shards, transform, batch_size, rank, world_size, seed, num_workers)`` has the interface of
``loader.py``: ``batches_per_epoch`` (equal on every rank) and ``epoch_iter(epoch, start_batch)``. What each
rank and worker reads is planned by ``shardplan.py`` from the shard counts alone (no communication): in epoch
mode the ranks' samples are disjoint and cover the epoch but for a tail of < world × batch samples; resuming at
(epoch, batch) continues exactly where the run stopped (same batches, nothing seen twice or skipped), provided
seed, world size, batch size, worker count and shuffle buffer are unchanged (``load_state_dict`` checks).

Per sample: the stored image bytes are opened lazily, ``seed_sample(seed, epoch, global id)`` seeds the
augmentation, and ``transform`` (e.g. ``SSLTransform``) makes crops, boxes, flips and iBOT masks; batches are
``collate_ssl`` dicts plus ``index`` (global sample ids of the samples in the batch). A sample that is missing, does
not decode or lies in a truncated part of a tar keeps its slot: it is filled with the next readable sample of the
batch (``corrupt.fill_corrupt``; a batch with none takes the first readable sample of the reader stream's epoch) and
counted in the batch's ``n_corrupt``, so every batch holds ``batch_size`` samples.

With an encoded transform (``data.augment=gpu``: ``encoded.EncodedSSLTransform``, or any transform with
``takes_bytes = True``) nothing is decoded here: the transform gets the stored image member's bytes (under the same
per-sample seed, so the iBOT masks are reproducible) and batches are ``encoded.collate_encoded`` dicts (packed
``encoded`` uint8 + ``encoded_sizes``, ``masks``, ``labels``, ``index``, ``n_corrupt``). Samples without an image
member or lost in a truncated tar are counted here; bytes that do not decode are dropped and counted on the device
by ``encoded.DeviceAugment``. Positions, ``batches_per_epoch`` and resume are those of the decoding path.
"""
from __future__ import annotations

import logging
import os
import random

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from sere_scale.data.corrupt import Corrupt, NoReadableSample, fill_corrupt
from sere_scale.data.pixels import open_image
from sere_scale.data.shardlist import ShardSet, is_local, resolve_shards
from sere_scale.data.shardplan import batches_per_epoch, stream_batches, stream_order, stream_pieces
from sere_scale.data.shardread import iter_piece
from sere_scale.data.transform import collate_ssl, seed_sample
from sere_scale.data.worker_signals import job_signals_held
from sere_scale.data.workers import DEFAULT_TIMEOUT_S, Workers

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
STATE_VERSION = 1


def takes_bytes(transform) -> bool:
    """True if the transform takes a sample's encoded image bytes (``data.augment=gpu``) instead of an image."""
    return bool(getattr(transform, "takes_bytes", False))


def _lazy_ok(transform) -> bool:
    """True if the transform takes a not-yet-decoded PIL image (e.g. to decode at reduced size)."""
    return bool(getattr(getattr(transform, "multicrop", transform), "lazy_decode", False))


class _StreamTasks(Sampler):
    """The rank's batches ``start_batch .. batches_per_epoch-1`` of the loader's current epoch as tasks
    ``(epoch, stream, batch of the stream)``: batch ``k`` is batch ``k // S`` of stream ``k % S``."""

    def __init__(self, loader: ShardLoader):
        self.ld = loader

    def __iter__(self):
        epoch, start = self.ld._next
        S = self.ld.streams
        return ((epoch, k % S, k // S) for k in range(start, self.ld.batches_per_epoch))

    def __len__(self) -> int:
        return self.ld.batches_per_epoch - self.ld._next[1]


class _StreamBatches(Dataset):
    """Task ``(epoch, s, c)``: batch ``c`` of reader stream ``s`` in ``epoch``. A worker keeps its streams' readers
    open and continues one while its tasks follow on; any other task (another epoch, a resume) opens a reader
    at that batch. The DataLoader deals tasks to its workers in turn from worker 0 on each epoch, so with
    ``S = num_workers`` streams each worker reads one stream per epoch, sequentially, as a dedicated reader."""

    def __init__(self, loader: ShardLoader):
        self.ld, self._readers = loader, {}

    def __len__(self) -> int:
        return self.ld.batches_per_epoch

    def __getitem__(self, task):
        epoch, s, c = task
        reader = self._readers.get((epoch, s))
        if reader is None or reader[0] != c:
            self._readers = {k: v for k, v in self._readers.items() if k[0] == epoch and k != (epoch, s)}
            reader = self._readers[(epoch, s)] = [c, self.ld.stream_batches_iter(epoch, s, c)]
        reader[0] += 1
        return next(reader[1])


class ShardLoader:
    def __init__(self, shards, transform, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 num_workers: int = 0, *, resampled: bool = False, shuffle: bool = True, shuffle_buffer: int = 1000,
                 split: str | None = None, prefetch_factor: int = 2,
                 worker_timeout_s: float = DEFAULT_TIMEOUT_S):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.shardset: ShardSet = resolve_shards(shards, split)
        self.transform, self.batch_size, self.rank, self.world = transform, batch_size, rank, world_size
        self.seed, self.num_workers, self.resampled, self.shuffle = seed, num_workers, resampled, shuffle
        self.shuffle_buffer, self.prefetch_factor = shuffle_buffer if shuffle else 0, prefetch_factor
        self.streams = max(1, num_workers)
        total, n = self.shardset.total, len(self.shardset.urls)
        missing = [u for u in self.shardset.urls if is_local(u) and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {n} shards do not exist (e.g. {missing[0]})")
        if self.batches_per_epoch < 1:
            raise ValueError(f"the shards hold {total} samples: not one batch of {batch_size} for each of "
                             f"{world_size} ranks")
        if not resampled and n < world_size * self.streams:
            raise ValueError(
                f"{n} shards for {world_size} ranks x {self.streams} reader streams (num_workers={num_workers}): "
                f"each stream needs a shard of its own. Use fewer workers, or re-shard with a smaller "
                f"--shard-size (sere-prep), or resampled=True")
        self.encoded = takes_bytes(transform)
        self._lazy = _lazy_ok(transform)
        self._position = self._next = (0, 0)
        self._warned = 0
        self.workers = Workers(num_workers, worker_timeout_s, f"shards '{shards}' (rank {rank})")
        self._dl = None

    # ---- interface used by the training loop ---------------------------------------------------------------
    @property
    def batches_per_epoch(self) -> int:
        return batches_per_epoch(self.shardset.total, self.world, self.batch_size)

    def epoch_iter(self, epoch: int, start_batch: int = 0):
        """Batches ``start_batch .. batches_per_epoch-1`` of ``epoch`` for this rank."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}]")
        if self.num_workers == 0:
            return self._tracked(self.stream_batches_iter(epoch, 0, start_batch), epoch, start_batch)
        self._next = (epoch, start_batch)
        if self._dl is None:  # one DataLoader for the run: its workers start once and serve every epoch
            g = torch.Generator().manual_seed(self.seed)  # keeps the global RNG untouched
            self._dl = DataLoader(_StreamBatches(self), batch_size=None, sampler=_StreamTasks(self), generator=g,
                                  prefetch_factor=self.prefetch_factor, **self.workers.kwargs())
        with job_signals_held():  # workers (and the forkserver, on first use) are born deaf to the job's signals
            it = iter(self._dl)
        return self._tracked(self.workers.guard(it, self._where), epoch, start_batch)

    def close(self) -> None:
        """Stop the workers now (else they stop when the loader is garbage-collected or the process exits)."""
        self._dl = None

    def _where(self) -> str:
        epoch, batch = self._position
        return f"batch {batch} of epoch {epoch}"

    def __getstate__(self) -> dict:  # what a worker gets: no DataLoader, no worker bookkeeping
        return {k: v for k, v in self.__dict__.items() if k not in ("_dl", "workers")}

    def _tracked(self, it, epoch: int, start_batch: int):
        self._position = (epoch, start_batch)
        for k, batch in enumerate(it, start_batch + 1):
            self._position = (epoch, k)
            yield batch

    # ---- resume bookkeeping ----------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        return {"version": STATE_VERSION, "seed": self.seed, "world_size": self.world, "rank": self.rank,
                "batch_size": self.batch_size, "streams": self.streams, "resampled": self.resampled,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "shards": self.shardset.digest()}

    def state_dict(self) -> dict:
        """Position (epoch, next batch) of the last iterator and the settings exact resume depends on."""
        epoch, batch = self._position
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch": batch, **self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError("cannot resume the shard loader exactly, settings differ (saved, now): " +
                             ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in diff.items()))
        self._position = (int(state["epoch"]), int(state["batch"]))

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, batch) the next batch would have; ``epoch_iter(*loader.position)`` resumes."""
        epoch, batch = self._position
        return (epoch + 1, 0) if batch >= self.batches_per_epoch else (epoch, batch)

    # ---- one reader stream -------------------------------------------------------------------------------------
    def stream_plan(self, epoch: int, s: int):
        """(pieces, emission order of positions) of stream ``s`` in ``epoch``."""
        counts = self.shardset.counts
        pieces = stream_pieces(counts, self.seed, epoch, self.rank, self.world, self.streams, s, self.batch_size,
                               self.resampled, self.shuffle)
        n = stream_batches(self.batches_per_epoch, self.streams, s) * self.batch_size
        return pieces, stream_order(n, self.shuffle_buffer, self.seed, epoch, self.rank, s)

    def _positions(self, pieces, skip: bytearray):
        """(position, sample or None) for positions not in ``skip``, in position order; unneeded shards unopened."""
        at = 0
        for pc in pieces:
            base = at
            at += len(pc)
            if all(skip[base:at]):
                continue
            url = self.shardset.urls[pc.shard]
            for j, sample in iter_piece(url, pc.lo, pc.hi, lambda j, b=base - pc.lo: not skip[b + j]):
                yield base + j - pc.lo, (pc, j, sample)

    def stream_batches_iter(self, epoch: int, s: int, consumed: int):
        B = self.batch_size
        pieces, order = self.stream_plan(epoch, s)
        start = consumed * B
        skip = bytearray(len(order))
        for p in order[:start]:
            skip[p] = 1
        reader = self._positions(pieces, skip)
        pending: dict[int, tuple] = {}
        batch = []
        keep_rng = get_worker_info() is None  # in the main process: leave the caller's RNG state alone

        def fallback():
            return self._first_readable(epoch, s, pieces, len(order), keep_rng)
        for p in order[start:]:
            while p not in pending:
                q, item = next(reader)
                pending[q] = item
            made = self._make(epoch, *pending.pop(p), keep_rng=keep_rng)
            batch.append(Corrupt(-1, fallback) if made is None else made)
            if len(batch) == B:
                yield self._collate(batch)
                batch = []

    def _first_readable(self, epoch: int, s: int, pieces, n: int, keep_rng: bool) -> dict:
        """The first readable sample of stream ``s``'s epoch, in read order: an all-corrupt batch's fallback."""
        for _, item in self._positions(pieces, bytearray(n)):
            made = self._make(epoch, *item, keep_rng=keep_rng)
            if made is not None:
                return made
        raise NoReadableSample(f"no sample of rank {self.rank}'s reader stream {s} in epoch {epoch} is readable")

    def _collate(self, samples: list) -> dict:
        samples, n_bad = fill_corrupt(samples)
        if self.encoded:
            from sere_scale.data.encoded import collate_encoded
            out = collate_encoded(samples)
        else:
            out = collate_ssl(samples)
        out["n_corrupt"] += n_bad
        out["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        return out

    def _make(self, epoch: int, pc, j: int, sample, keep_rng: bool = False) -> dict | None:
        if sample is None:
            return None
        gid = self.shardset.offsets[pc.shard] + j
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if key is None:
            return self._corrupt(gid, f"no image member (has {sorted(sample)})")
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
        except ValueError:
            label = -1
        states = (random.getstate(), torch.get_rng_state()) if keep_rng else None
        try:
            seed_sample(self.seed, epoch, gid if pc.draw < 0 else gid + self.shardset.total * (pc.draw + 1))
            if self.encoded:  # decoded (and checked) on the device: encoded.DeviceAugment
                return self._labelled(self.transform(sample[key]), label, gid)
            try:
                img = open_image(sample[key], f"{sample.get('__url__', 'shard')}:{sample.get('__key__', '?')}")
                if not self._lazy:
                    img.load()
            except DECODE_ERRORS as e:
                return self._corrupt(gid, e)
            if self._lazy:
                try:
                    out = self.transform(img)
                except DECODE_ERRORS as e:
                    return self._corrupt(gid, e)
            else:
                out = self.transform(img)
        finally:
            if states is not None:
                random.setstate(states[0])
                torch.set_rng_state(states[1])
        return self._labelled(out, label, gid)

    @staticmethod
    def _labelled(out: dict, label: int, gid: int) -> dict:
        out["label"], out["index"] = label, gid
        return out

    def _corrupt(self, gid: int, why) -> None:
        if self._warned < 20:
            self._warned += 1
            log.warning("skipping sample %d (%s): counted in n_corrupt", gid, why)
