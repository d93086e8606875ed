"""Where the shards are and how many samples each holds (the loader plans epochs from these counts).

A spec is one of:

* a folder holding ``_info.json``, or the path of that file, optionally followed by ``#SPLIT`` (default
  ``train``, or the only split): timm's layout, ``splits.SPLIT.filenames`` relative to the file's folder;
* a list file (any other existing file): one ``URL [COUNT]`` per line, ``#`` comments, relative paths are
  relative to the list file;
* a brace pattern or ``::``-separated URLs (``/data/in1k/imagenet-train-{000000..001281}.tar``,
  ``pipe:curl -s http://host/shard-{0000..0099}.tar``), or a Python list of URLs. Counts come from the
  ``_info.json`` beside local shards, else by reading the local tars' headers; ``pipe:`` URLs need counts.

URLs are local paths or anything ``webdataset.gopen`` opens (``pipe:CMD`` runs CMD and reads its stdout).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

log = logging.getLogger(__name__)


class ShardSpecError(ValueError):
    pass


@dataclass(frozen=True)
class ShardSet:
    urls: tuple[str, ...]
    counts: tuple[int, ...]

    def __post_init__(self):
        if len(self.urls) != len(self.counts):
            raise ShardSpecError(f"{len(self.urls)} shard URLs but {len(self.counts)} counts")
        if not self.urls:
            raise ShardSpecError("the shard list is empty")
        if any(c < 0 for c in self.counts):
            raise ShardSpecError("negative sample count in the shard list")

    @property
    def total(self) -> int:
        return sum(self.counts)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Global id of the first sample of each shard (ids follow the listed order)."""
        out, at = [], 0
        for c in self.counts:
            out.append(at)
            at += c
        return tuple(out)

    def digest(self) -> str:
        h = hashlib.sha256()
        for u, c in zip(self.urls, self.counts):
            h.update(f"{os.path.basename(u.rstrip('/'))}\t{c}\n".encode())
        return h.hexdigest()[:16]


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and not url.startswith("file:")


def _join(base: str, url: str) -> str:
    return url if not is_local(url) or os.path.isabs(url) else os.path.join(base, url)


def count_tar_samples(path: str) -> int:
    """Number of samples (distinct keys, webdataset's grouping) in a local tar, reading headers only."""
    n, last = 0, None
    with tarfile.open(path, "r:") as tf:
        for ti in tf:
            if ti.isfile():
                key = sample_key(ti.name)
                if key != last:
                    n, last = n + 1, key
    return n


def sample_key(name: str) -> str:
    """WebDataset's key: the member path up to the first dot of its base name."""
    d, _, base = name.rpartition("/")
    stem = base.split(".", 1)[0]
    return f"{d}/{stem}" if d else stem


# a split asked for under one name and stored under the other (timm's ImageNet shards: 'validation')
SPLIT_ALIASES = {"val": "validation", "validation": "val"}


def from_info(path: str, split: str | None = None) -> ShardSet:
    with open(path) as f:
        info = json.load(f)
    splits = info.get("splits") or {}
    if split is None:
        split = "train" if "train" in splits or len(splits) != 1 else next(iter(splits))
    if split not in splits and SPLIT_ALIASES.get(split) in splits:  # timm's layout names it 'validation'
        split = SPLIT_ALIASES[split]
    if split not in splits:
        raise ShardSpecError(f"split '{split}' not in {path} (it has {sorted(splits)}); add '#SPLIT' to the spec")
    sp = splits[split]
    base = os.path.dirname(os.path.abspath(path))
    return ShardSet(tuple(_join(base, f) for f in sp["filenames"]), tuple(int(c) for c in sp["shard_lengths"]))


def from_list_file(path: str) -> ShardSet:
    base = os.path.dirname(os.path.abspath(path))
    urls, counts = [], []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            url, cnt = (parts[0], int(parts[1])) if len(parts) == 2 and parts[1].isdigit() else (line, None)
            urls.append(_join(base, url))
            counts.append(cnt)
    return with_counts(urls, counts, f"list file {path}")


def with_counts(urls: Sequence[str], counts: Sequence[int | None], what: str) -> ShardSet:
    """Fill missing counts from an ``_info.json`` beside local shards, else from the local tars themselves."""
    counts = list(counts)
    if any(c is None for c in counts):
        infos: dict[str, dict[str, int]] = {}
        for i, u in enumerate(urls):
            if counts[i] is not None or not is_local(u):
                continue
            d = os.path.dirname(os.path.abspath(u))
            if d not in infos:
                infos[d] = {}
                ip = os.path.join(d, "_info.json")
                if os.path.exists(ip):
                    with open(ip) as f:
                        for sp in json.load(f).get("splits", {}).values():
                            infos[d].update(zip(sp["filenames"], sp["shard_lengths"]))
            counts[i] = infos[d].get(os.path.basename(u))
        uncounted = [u for u, c in zip(urls, counts) if c is None]
        remote = [u for u in uncounted if not is_local(u)]
        if remote:
            raise ShardSpecError(f"no sample counts for {len(remote)} remote shards of {what} (e.g. {remote[0]}): "
                                 "use an _info.json or a list file with 'URL COUNT' lines")
        if uncounted:
            log.warning("counting the samples of %d shards without _info.json (reads tar headers)", len(uncounted))
            for i, u in enumerate(urls):
                if counts[i] is None:
                    if not os.path.exists(u):
                        raise ShardSpecError(f"shard {u} of {what} does not exist")
                    counts[i] = count_tar_samples(u)
    return ShardSet(tuple(urls), tuple(int(c) for c in counts))


def resolve_shards(spec, split: str | None = None) -> ShardSet:
    """A :class:`ShardSet` from any spec of the module docstring."""
    if isinstance(spec, ShardSet):
        return spec
    if isinstance(spec, (list, tuple)):
        return with_counts(list(spec), [None] * len(spec), "the shard list")
    if not isinstance(spec, str) or not spec:
        raise ShardSpecError(f"bad shard spec {spec!r}")
    path, _, sp = spec.partition("#") if is_local(spec) else (spec, "", "")
    split = sp or split
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "_info.json")):
            raise ShardSpecError(f"folder {path} has no _info.json (give a brace pattern or a list file instead)")
        return from_info(os.path.join(path, "_info.json"), split)
    if path.endswith(".json"):
        if not os.path.exists(path):
            raise ShardSpecError(f"{path} does not exist")
        return from_info(path, split)
    if os.path.isfile(path) and not path.endswith(".tar"):
        return from_list_file(path)
    from webdataset.shardlists import expand_urls
    urls = expand_urls(spec)
    missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
    if missing:
        raise ShardSpecError(f"{len(missing)} of {len(urls)} shards of '{spec}' do not exist (e.g. {missing[0]})")
    return with_counts(urls, [None] * len(urls), f"'{spec}'")
