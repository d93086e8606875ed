"""Labelled evaluation images from an image folder or from WebDataset shards (k-NN, linear probe, invariance).

Every evaluation path (``--train-data``, ``--val-data``, ``--data``, ``eval.val_path``,
``eval.knn_train_path``, ``eval.invariance_data``) is one of two kinds, told apart by :func:`is_shard_spec`:

* an **existing folder without** ``_info.json``: an image folder (``ROOT/<class>/<image>`` for labelled
  evaluation; any image files below it for invariance), or an existing image file (invariance only);
* **anything else** is a shard spec as ``shardlist.resolve_shards`` reads it: a folder holding ``_info.json``
  (``sere-prep``'s output), the path of an ``_info.json``, either optionally followed by ``#SPLIT``; a list file
  (any other existing file); a brace pattern / ``::`` list / ``pipe:`` or remote URL.

A converter output folder always holds ``_info.json`` and an image folder never does, so the rule cannot confuse
the two. When an ``_info.json`` spec names no ``#SPLIT``, the split is the role's: ``train`` for training-side
paths (``--train-data``, ``eval.knn_train_path``), ``val`` for the others; a missing split is an error naming the
ones there.

Shard samples are read in the listed order (``_info.json``'s ``filenames``, the list file's lines, the brace
expansion), and in tar order inside a shard; the sample index is that position. Labels are the ``cls`` member
(decimal text, as ``sere-prep`` writes the class index; its classes are the sorted class folder names of the
training split, which is the class order ``scan_folder`` and torchvision's ``ImageFolder`` use). A sample without
an image member or a readable ``cls``, whose image does not decode, or that is lost in a truncated or unreadable
tar, is skipped and counted as corrupt.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from sere_scale.data.folder import IMG_EXT, scan_folder
from sere_scale.data import pixels
from sere_scale.data.shardlist import ShardSet, ShardSpecError, is_local, resolve_shards
from sere_scale.data.shardread import iter_piece
from sere_scale.data.shards import DECODE_ERRORS, IMAGE_KEYS

log = logging.getLogger(__name__)
MAX_WARNINGS = 20  # per process and data set, as the shard loader


class CorruptSample(ValueError):
    pass


def is_shard_spec(spec) -> bool:
    """True if ``spec`` names WebDataset shards, False for an image folder or image file (module doc)."""
    if not isinstance(spec, (str, os.PathLike)):
        return True  # a list of URLs or a ShardSet
    s = os.fspath(spec)
    if os.path.isdir(s):
        return os.path.isfile(os.path.join(s, "_info.json"))
    if os.path.isfile(s):
        return Path(s).suffix.lower() not in IMG_EXT
    return True


def _missing_local(spec: str) -> bool:
    """A local path (not a pattern, ``::`` list or URL) that does not exist, also without its ``#SPLIT``."""
    if not is_local(spec) or "{" in spec or "::" in spec:
        return False
    return not os.path.exists(spec) and not os.path.exists(spec.partition("#")[0])


def resolve_eval_shards(spec, split: str | None = None) -> ShardSet:
    """The shard set of an evaluation path; ``split``: the role's default split for ``_info.json`` specs."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str) and _missing_local(spec):
        raise FileNotFoundError(f"'{spec}' does not exist: expected an image folder (ROOT/<class>/<image>) or a "
                                "shard spec (a folder with _info.json, a list file or a brace pattern)")
    try:
        return resolve_shards(spec, split)
    except ShardSpecError as e:
        raise ShardSpecError(f"evaluation data '{spec}': {e}") from e


def shard_classes(spec, shards: ShardSet) -> list[str] | None:
    """Class names from the ``_info.json`` of the spec, or beside its first local shard; ``None`` if there is
    none (labels are then just the ``cls`` indices)."""
    candidates = []
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec).partition("#")[0]
        candidates.append(os.path.join(path, "_info.json") if os.path.isdir(path) else path)
    local = [u for u in shards.urls if is_local(u)]
    if local:
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(local[0])), "_info.json"))
    for c in candidates:
        if c.endswith(".json") and os.path.isfile(c):
            try:
                with open(c) as f:
                    classes = json.load(f).get("classes")
            except (OSError, ValueError):
                continue
            if classes:
                return [str(x) for x in classes]
    return None


def source_id(spec, split: str | None = None) -> dict:
    """What identifies an evaluation data set in a cache key: the resolved folder, or the shard URLs (local ones
    absolute) with their counts."""
    if not is_shard_spec(spec):
        return {"root": str(Path(spec).resolve())}
    ss = resolve_eval_shards(spec, split)
    urls = [os.path.abspath(u) if is_local(u) else u for u in ss.urls]
    return {"shards": urls, "counts": list(ss.counts)}


def decode_rgb(data: bytes) -> Image.Image:
    """The folder path's decode (``folder.load_rgb``) of in-memory bytes; raises on unreadable data."""
    return pixels.decode_rgb(data)


def sample_image(sample: dict) -> Image.Image:
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise CorruptSample(f"no image member (has {sorted(sample)})")
    try:
        return decode_rgb(sample[key])
    except DECODE_ERRORS as e:
        raise CorruptSample(f"{type(e).__name__}: {e}") from e


def sample_label(sample: dict) -> int:
    try:
        return int(sample["cls"])
    except KeyError:
        raise CorruptSample(f"no 'cls' member (has {sorted(sample)})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptSample(f"unreadable 'cls' {sample['cls'][:20]!r}") from e


def iter_shard_samples(shards: ShardSet, worker: int = 0, workers: int = 1,
                       want: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict | None]]:
    """``(index, sample or None)`` of shards ``worker, worker + workers, ...`` in listed order; index = position
    in the whole set. ``want(index)`` selects samples (unwanted ones are skipped, by seeking where local)."""
    for i, (url, n) in enumerate(zip(shards.urls, shards.counts)):
        if i % workers != worker or n == 0:
            continue
        base = shards.offsets[i]
        if want is not None and not any(want(base + j) for j in range(n)):
            continue
        sel = (lambda j: True) if want is None else (lambda j, b=base: want(b + j))
        for j, sample in iter_piece(url, 0, n, sel):
            yield base + j, sample


class _Warner:
    def __init__(self, what: str):
        self.what, self.n = what, 0

    def __call__(self, index: int, why) -> None:
        if self.n < MAX_WARNINGS:
            self.n += 1
            log.warning("skipping corrupt sample %d of %s: %s", index, self.what, why)


class LabelledFolder(Dataset):
    """``(transform(image), label, index)`` of every image of ``ROOT/<class>/<image>``; ``None`` if unreadable."""

    def __init__(self, root: str, transform: Callable):
        self.root = str(root)
        self.items, self.classes = scan_folder(root)
        self.tf = transform
        self.total = len(self.items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from sere_scale.data.folder import load_rgb
        path, label = self.items[i]
        img = load_rgb(path)  # warns itself
        if img is None:
            return None
        return self.tf(img), label, i


class LabelledShards(IterableDataset):
    """``(transform(image), label, index)`` of every sample of a shard set in listed order (``None`` for a
    corrupt one). With DataLoader workers, worker w reads shards w, w+W, ...; sort by index for the listed
    order."""

    def __init__(self, spec, transform: Callable, split: str | None = None):
        self.spec = spec
        self.shards = resolve_eval_shards(spec, split)
        self.classes = shard_classes(spec, self.shards)
        self.tf = transform
        self.total = self.shards.total

    def __iter__(self):
        wi = get_worker_info()
        w, W = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        warn = _Warner(str(self.spec))
        for index, sample in iter_shard_samples(self.shards, w, W):
            if sample is None:
                warn(index, "missing (truncated or unreadable shard)")
                yield None
                continue
            try:
                label = sample_label(sample)
                img = sample_image(sample)
            except CorruptSample as e:
                warn(index, e)
                yield None
                continue
            yield self.tf(img), label, index


def labelled_dataset(root, transform: Callable, split: str | None = None) -> LabelledFolder | LabelledShards:
    """The labelled data set of an evaluation path: folder or shards (:func:`is_shard_spec`)."""
    if is_shard_spec(root):
        return LabelledShards(root, transform, split)
    return LabelledFolder(root, transform)


# ------------------------------------------------------------------------------------------ unlabelled images
class ShardImages:
    """A selection of a shard set's samples for :func:`iter_rgb` (images only: labels are not read)."""

    def __init__(self, spec, limit: int | None = None, split: str | None = None):
        self.spec = spec
        self.shards = resolve_eval_shards(spec, split)
        n = self.shards.total
        if n == 0:
            raise ValueError(f"no samples in '{spec}'")
        if limit is not None and 0 < limit < n:  # evenly strided, as list_images on a folder
            step = n / limit
            self.indices = [int(i * step) for i in range(limit)]
        else:
            self.indices = list(range(n))

    def __len__(self):
        return len(self.indices)

    def __iter__(self) -> Iterator[Image.Image | None]:
        wanted = set(self.indices)
        warn = _Warner(str(self.spec))
        for index, sample in iter_shard_samples(self.shards, want=wanted.__contains__):
            if sample is None:
                warn(index, "missing (truncated or unreadable shard)")
                yield None
                continue
            try:
                yield sample_image(sample)
            except CorruptSample as e:
                warn(index, e)
                yield None


def iter_rgb(images) -> Iterator[Image.Image | None]:
    """RGB images (``None`` for unreadable ones) of a list of image paths or a :class:`ShardImages`, in order."""
    if isinstance(images, ShardImages):
        yield from images
        return
    from sere_scale.data.folder import load_rgb
    for path in images:
        yield load_rgb(path)
