"""Frozen-backbone feature extraction on labelled images: an image folder or WebDataset shards
(``data/evaldata.py``: how the two are told apart, sample order, labels, corrupt samples).

One process reads the whole data set (no split over ranks: the training-time hooks run it on rank 0 only).
Features come back in the data set's order (a folder's sorted order, the shards' listed order) whatever the
number of loader workers.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T

from sere_scale.data.evaldata import LabelledFolder, LabelledShards, labelled_dataset
from sere_scale.data.multicrop import IMAGENET_MEAN, IMAGENET_STD
from sere_scale.data.worker_signals import job_signals_held
from sere_scale.data.workers import DEFAULT_TIMEOUT_S, Workers

log = logging.getLogger(__name__)
__all__ = ["eval_transform", "extract_features", "LabelledFolder", "LabelledShards"]


def eval_transform(size: int):
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _collate(items):
    """(images or None, labels, indices, number of corrupt items) of a batch."""
    ok = [x for x in items if x is not None]
    if not ok:
        return None, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), len(items)
    return (torch.stack([x[0] for x in ok]), torch.tensor([x[1] for x in ok], dtype=torch.long),
            torch.tensor([x[2] for x in ok], dtype=torch.long), len(items) - len(ok))


@torch.no_grad()
def extract_features(backbone, root, size: int, batch_size: int = 64, device="cpu", num_workers: int = 0,
                     split: str | None = None, stats: dict | None = None):
    """L2-normalised CLS features (normed output of the backbone), labels and class names (``None`` for shards
    without an ``_info.json``) of every readable image of ``root``, an image folder or a shard spec; ``split``:
    the split read from an ``_info.json`` spec without ``#SPLIT``. Unreadable samples are skipped, logged and
    counted; ``stats`` (a dict), if given, receives ``n`` (features) and ``n_corrupt``."""
    ds = labelled_dataset(root, eval_transform(size), split)
    # one pass: workers (forkserver, job signals ignored, batch timeout; data/workers.py) end with it
    workers = Workers(num_workers, DEFAULT_TIMEOUT_S, f"evaluation data '{root}'")
    dl = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=_collate, **workers.kwargs(persistent=False))
    feats, labels, index, n_corrupt = [], [], [], 0
    backbone = backbone.to(device).eval()
    with job_signals_held():  # workers (and the forkserver, on first use) are born deaf to the job's signals
        batches = iter(dl)
    for x, y, i, bad in workers.guard(batches):
        n_corrupt += bad
        if x is None:
            continue
        f = backbone(x.to(device))["cls"].float()
        feats.append(F.normalize(f, dim=-1).cpu())
        labels.append(y)
        index.append(i)
    if not feats:
        raise ValueError(f"no readable images in '{root}' ({n_corrupt} corrupt)")
    feats, labels, index = torch.cat(feats), torch.cat(labels), torch.cat(index)
    if num_workers and isinstance(ds, LabelledShards):  # workers read whole shards each: restore listed order
        order = index.argsort()
        feats, labels = feats[order], labels[order]
    if n_corrupt:
        log.warning("skipped %d corrupt of %d samples of '%s'", n_corrupt, ds.total, root)
    if stats is not None:
        stats.update(n=int(labels.numel()), n_corrupt=int(n_corrupt))
    return feats, labels, ds.classes
