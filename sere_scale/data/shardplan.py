"""Epoch plans for the shard loader: pure functions of (counts, seed, epoch, rank, world, streams, batch).

Epoch mode: the shards, shuffled with (seed, epoch), are read as one stream of ``total`` sample positions.
Every rank gets ``batches_per_epoch × batch`` consecutive positions (the tail, < world × batch samples, is left
out this epoch), so all ranks take the same number of steps and no sample is on two ranks. A rank's batches go
round-robin to its ``S`` reader streams (DataLoader workers; one stream without workers): stream ``s`` gets
batches ``s, s+S, ...`` and reads its own consecutive run of positions. Within a stream, samples leave in the
order of a seeded reservoir shuffle (buffer ``shuffle_buffer``) simulated on positions; that order is known in
advance, so resuming at batch ``k`` skips exactly what was consumed (whole shards without opening them).

Resampled mode: stream (rank, s) draws whole shards with replacement, seeded by (seed, epoch, rank, s), until it
has its share of positions; epochs have the same number of batches as in epoch mode.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """Samples ``lo .. hi-1`` of shard ``shard`` (in its stored order); ``draw`` numbers resampled draws."""
    shard: int
    lo: int
    hi: int
    draw: int = -1

    def __len__(self) -> int:
        return self.hi - self.lo


def batches_per_epoch(total: int, world: int, batch: int) -> int:
    return total // (world * batch)


def stream_batches(bpe: int, streams: int, s: int) -> int:
    """Batches of stream ``s``: those b < bpe with b % streams == s."""
    return bpe // streams + (s < bpe % streams)


def consumed_batches(start_batch: int, streams: int, s: int) -> int:
    """How many of stream ``s``'s batches come before the rank's batch ``start_batch``."""
    return max(0, (start_batch - s + streams - 1) // streams)


def shard_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def cut(order: Sequence[int], counts: Sequence[int], start: int, stop: int) -> list[Piece]:
    """Pieces covering positions [start, stop) of the concatenation of shards ``order``."""
    pieces, at = [], 0
    for sh in order:
        c = counts[sh]
        lo, hi = max(start, at), min(stop, at + c)
        if lo < hi:
            pieces.append(Piece(sh, lo - at, hi - at))
        at += c
        if at >= stop:
            break
    return pieces


def stream_pieces(counts: Sequence[int], seed: int, epoch: int, rank: int, world: int, streams: int, s: int,
                  batch: int, resampled: bool = False, shuffle: bool = True) -> list[Piece]:
    """The pieces stream ``s`` of ``rank`` reads in ``epoch`` (``stream_batches × batch`` positions)."""
    bpe = batches_per_epoch(sum(counts), world, batch)
    need = stream_batches(bpe, streams, s) * batch
    if resampled:
        rng = random.Random(f"draws:{seed}:{epoch}:{rank}:{s}")
        nonempty = [i for i, c in enumerate(counts) if c > 0]
        pieces, have = [], 0
        while have < need:
            sh = nonempty[rng.randrange(len(nonempty))]
            take = min(counts[sh], need - have)
            pieces.append(Piece(sh, 0, take, draw=len(pieces)))
            have += take
        return pieces
    first = rank * bpe * batch + sum(stream_batches(bpe, streams, t) for t in range(s)) * batch
    return cut(shard_order(len(counts), seed, epoch, shuffle), counts, first, first + need)


def reservoir_order(n: int, size: int, rng: random.Random) -> list[int]:
    """Order in which a shuffle buffer of ``size`` emits inputs 0..n-1 (webdataset-style, deterministic)."""
    if size <= 1:
        return list(range(n))
    buf: list[int] = []
    out: list[int] = []
    for q in range(n):
        buf.append(q)
        if len(buf) >= size:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            out.append(buf.pop())
    rng.shuffle(buf)
    out.extend(buf)
    return out


def stream_order(n: int, size: int, seed: int, epoch: int, rank: int, s: int) -> list[int]:
    return reservoir_order(n, size, random.Random(f"buffer:{seed}:{epoch}:{rank}:{s}"))
