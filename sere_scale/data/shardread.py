"""Read samples ``lo .. hi-1`` of one tar shard, grouping members by key as webdataset does.

Local shards are opened seekable, so unwanted samples are skipped by seeking over their data; other URLs
(``pipe:``, ``http``) go through ``webdataset.gopen`` and are streamed. A shard that cannot be opened, ends
early or is damaged yields ``None`` for each of its missing samples, so the caller's accounting stays exact.
"""
from __future__ import annotations

import logging
import tarfile
from collections.abc import Callable, Iterator

from sere_scale.data.pipes import PipeStream
from sere_scale.data.shardlist import is_local, sample_key

log = logging.getLogger(__name__)
Sample = dict  # {ext: bytes}


def _open(url: str):
    if is_local(url):
        return tarfile.open(url, "r:"), None
    if url.startswith("pipe:"):  # ends with the worker (data/pipes.py), unlike webdataset's own Popen
        stream = PipeStream(url[len("pipe:"):])
        return tarfile.open(fileobj=stream, mode="r|"), stream
    from webdataset.gopen import gopen
    stream = gopen(url, "rb")
    return tarfile.open(fileobj=stream, mode="r|"), stream


def iter_piece(url: str, lo: int, hi: int, want: Callable[[int], bool]
               ) -> Iterator[tuple[int, Sample | None]]:
    """Yield ``(j, sample)`` for every ``lo <= j < hi`` with ``want(j)``, in order; ``sample`` is ``None`` if it
    is missing or unreadable."""
    j, key, cur = -1, None, None  # index, key and members of the sample being read
    emitted = lo  # next index to yield
    try:
        tf, stream = _open(url)
    except Exception as e:  # noqa: BLE001 - unreadable shard: all its samples are missing
        log.warning("cannot open shard %s: %s", url, e)
        tf = stream = None
    try:
        if tf is not None:
            for ti in tf:
                if not ti.isfile():
                    continue
                k = sample_key(ti.name)
                if k != key:
                    if cur is not None and j >= lo:  # sample j is complete
                        yield j, cur
                        emitted = j + 1
                    j, key = j + 1, k
                    if j >= hi:
                        break
                    cur = {} if j >= lo and want(j) else None
                if cur is not None:
                    cur[ti.name.rpartition("/")[2].partition(".")[2]] = tf.extractfile(ti).read()
            else:
                if cur is not None and lo <= j < hi:
                    yield j, cur
                    emitted = j + 1
            if j + 1 < hi:
                log.warning("shard %s ended after %d samples; %d of its samples are counted as corrupt",
                            url, j + 1, hi - max(j + 1, lo))
    except Exception as e:  # noqa: BLE001 - truncated or damaged tar
        log.warning("shard %s is damaged after %d samples (%s: %s)", url, j + 1, type(e).__name__, e)
        if cur is not None and lo <= j < hi and cur:
            yield j, cur  # what was read of the last sample; the decoder decides if it is usable
            emitted = j + 1
    finally:
        for c in (tf, stream):
            try:
                if c is not None:
                    c.close()
            except Exception as e:  # noqa: BLE001 - e.g. a pipe closed early
                log.debug("closing %s: %s", url, e)
    for m in range(max(emitted, lo), hi):
        if want(m):
            yield m, None
