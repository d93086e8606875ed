"""Corrupt samples keep their slot: every batch holds exactly ``data.batch_size`` samples, whatever the data.

Datasets return a :class:`Corrupt` marker (or ``None``) for a sample that cannot be read. Before collating,
:func:`fill_corrupt` puts in each such slot a copy of the next readable sample after it in the same batch
(wrapping around to the batch's start), so the replacement is one of this rank's samples of this epoch and is a
function of the batch alone: a resumed run makes the same batches. A batch with no readable sample at all takes,
in every slot, the sample ``fallback`` finds (the folder dataset: the next readable file after the batch's first
index, in file order; the shard loader: the first readable sample of the reader stream's epoch) — deterministic
too. The replaced slots are counted in the batch's ``n_corrupt``.

Equal batch sizes matter beyond tidiness: MoCo v3 all-gathers the keys of every rank, which needs equal sizes,
and a rank with a shorter batch would weigh its samples differently in the gradient average.
"""
from __future__ import annotations

from typing import Callable, Optional


class Corrupt:
    """Marker for an unreadable sample: its ``index`` and the ``fallback`` (a no-argument callable returning a
    readable sample) an all-corrupt batch takes. It lives only between a dataset and the collate of the same
    process (a DataLoader worker collates its own samples), so the callable is never pickled."""

    __slots__ = ("index", "fallback")

    def __init__(self, index: int, fallback: Optional[Callable[[], dict]] = None):
        self.index, self.fallback = int(index), fallback

    def __repr__(self) -> str:
        return f"Corrupt({self.index})"


class NoReadableSample(RuntimeError):
    """No readable sample to fill an all-corrupt batch with: the data are unreadable."""


def is_corrupt(sample) -> bool:
    return sample is None or isinstance(sample, Corrupt)


def fill_corrupt(samples: list, fallback: Optional[Callable[[], dict]] = None) -> tuple[list, int]:
    """``(samples with every corrupt slot filled, number of slots filled)``; see the module docstring. An
    all-corrupt batch uses ``fallback``, else the first marker's own."""
    n = len(samples)
    bad = [is_corrupt(s) for s in samples]
    n_bad = sum(bad)
    if n_bad == 0:
        return list(samples), 0
    if n_bad == n:
        fallback = fallback or next((s.fallback for s in samples if isinstance(s, Corrupt) and s.fallback), None)
        if fallback is None:
            raise NoReadableSample(f"all {n} samples of a batch are unreadable and no fallback is available")
        donor = fallback()
        if is_corrupt(donor):
            raise NoReadableSample(f"all {n} samples of a batch are unreadable and so is the fallback")
        return [donor] * n, n_bad
    out = list(samples)
    for i in range(n):
        if bad[i]:
            out[i] = next(samples[(i + k) % n] for k in range(1, n) if not bad[(i + k) % n])
    return out, n_bad


def fill_slots(kept: list[int], n: int) -> list[int]:
    """For ``n`` slots of which the positions ``kept`` (sorted) hold readable samples: for each slot, the position
    in ``kept`` of the sample it takes (itself, or the next kept one after it, wrapping) — the same rule as
    :func:`fill_corrupt`, for batches whose corrupt samples are found after collating (``encoded.DeviceAugment``)."""
    if not kept:
        raise NoReadableSample(f"all {n} samples of a batch are unreadable")
    where = {p: j for j, p in enumerate(kept)}
    out = []
    for i in range(n):
        k = next(i + k for k in range(n) if (i + k) % n in where)
        out.append(where[k % n])
    return out
