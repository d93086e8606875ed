"""Label propagation between the frames of a video, as DINO evaluates semi-supervised video object segmentation
(``eval_video_segmentation.py``: ``label_propagation``; Caron et al. 2021, after Jabri et al. 2020).

Each target frame's patches take a weighted average of the labels of the patches of a context: frame 0 (its
one-hot annotation) and the ``n_last_frames`` frames before the target (their SOFT predictions, a FIFO queue). The
weights are ``exp(cos / temperature)`` between L2-normalised patch features; with ``neighborhood > 0`` a context
patch more than ``neighborhood`` patches away (in rows or columns, a square window) from the query patch gets weight
0; then per query only the ``topk`` largest weights (and any equal to the k-th) are kept and normalised to sum 1.

DINO builds the whole (h·w)² window mask and affinity per context frame at once; here the queries go in chunks so
that memory stays bounded for large frames. Everything is float32 as in DINO: with unit vectors ``cos <= 1``, so the
largest weight is ``exp(1 / temperature)`` (e^10 at the default), far below float32's limit; a temperature whose
``exp(1 / temperature)`` would overflow is refused.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

__all__ = ["propagate_video", "iter_propagation"]

# affinity entries per query chunk (float32: 64 MiB for the affinity; the window mask is n_ctx times smaller)
_CHUNK_ELEMENTS = 1 << 24


def _check_args(n_last_frames: int, topk: int, temperature: float, neighborhood: int) -> None:
    if n_last_frames < 0:
        raise ValueError(f"n_last_frames must be >= 0, got {n_last_frames}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if neighborhood < 0:
        raise ValueError(f"neighborhood must be >= 0 (0: no restriction), got {neighborhood}")
    if not temperature > 0 or 1.0 / temperature >= math.log(torch.finfo(torch.float32).max):
        raise ValueError(f"temperature {temperature}: exp(1/temperature) must be finite in float32 "
                         f"(temperature > {1.0 / math.log(torch.finfo(torch.float32).max):.4f})")


def _window_mask(rows: torch.Tensor, cols: torch.Tensor, start: int, stop: int, nb: int) -> torch.Tensor:
    """(stop-start, h·w) float 0/1: 1 where key patch (p, q) lies in the (2·nb+1)² window of query patch (i, j)
    (|p-i| <= nb and |q-j| <= nb; the window is clipped by the frame's borders)."""
    qr, qc = rows[start:stop, None], cols[start:stop, None]
    return (((rows[None, :] - qr).abs() <= nb) & ((cols[None, :] - qc).abs() <= nb)).float()


def _propagate_frame(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, n_ctx: int, hw: int,
                     rows: torch.Tensor, cols: torch.Tensor, topk: int, temperature: float, neighborhood: int,
                     query_chunk: int | None) -> torch.Tensor:
    """(h·w, K) soft labels of one target frame. ``query`` (h·w, C) and ``keys`` (n_ctx·h·w, C) unit rows, keys of
    context frame c at rows c·h·w ... (c+1)·h·w - 1; ``labels`` (n_ctx·h·w, K)."""
    n_keys = keys.shape[0]
    if topk > n_keys:
        raise ValueError(f"topk={topk} exceeds the {n_keys} context patches ({n_ctx} frames of {hw} patches)")
    chunk = query_chunk if query_chunk else max(1, _CHUNK_ELEMENTS // n_keys)
    out = query.new_empty(hw, labels.shape[1])
    for start in range(0, hw, chunk):
        stop = min(start + chunk, hw)
        aff = torch.exp(query[start:stop] @ keys.T / temperature)  # (chunk, n_ctx·h·w)
        if neighborhood > 0:  # the same window in every context frame
            aff.view(stop - start, n_ctx, hw).mul_(_window_mask(rows, cols, start, stop, neighborhood)[:, None])
        kth = torch.topk(aff, k=topk, dim=1).values.min(dim=1, keepdim=True).values
        aff.masked_fill_(aff < kth, 0)  # ties at the k-th value are kept, as DINO's aff[aff < tk_val_min] = 0
        aff /= aff.sum(dim=1, keepdim=True)
        out[start:stop] = aff @ labels
    return out


def _patch_tokens(feat: torch.Tensor, shape: tuple, t: int) -> torch.Tensor:
    if feat.dim() != 3 or (shape and tuple(feat.shape) != shape):
        raise ValueError(f"frame {t}: features must be (h, w, C){' = ' + str(shape) if shape else ''}, "
                         f"got {tuple(feat.shape)}")
    return F.normalize(feat.reshape(-1, feat.shape[-1]).float(), dim=1, p=2)


def iter_propagation(frame_feats: Iterable[torch.Tensor], first_labels: torch.Tensor, n_last_frames: int = 7,
                     topk: int = 5, temperature: float = 0.1, neighborhood: int = 12, *,
                     query_chunk: int | None = None) -> Iterator[torch.Tensor]:
    """Like ``propagate_video`` but lazy: ``frame_feats`` may be a generator (features computed one frame at a
    time); yields the (K, h, w) soft map of frames 1, 2, ... as each is reached. Only the features and soft maps of
    frame 0 and of the last ``n_last_frames`` frames are held."""
    _check_args(n_last_frames, topk, temperature, neighborhood)
    frames = iter(frame_feats)
    try:
        feat0 = next(frames)
    except StopIteration:
        raise ValueError("frame_feats is empty: need at least frame 0") from None
    key0 = _patch_tokens(feat0, (), 0)
    h, w, c = feat0.shape
    if first_labels.dim() != 3 or tuple(first_labels.shape[1:]) != (h, w):
        raise ValueError(f"first_labels must be (K, h, w) with (h, w) = {(h, w)} (frame 0's patch grid), "
                         f"got {tuple(first_labels.shape)}")
    n_cls = first_labels.shape[0]
    labels0 = first_labels.to(device=key0.device, dtype=torch.float32).reshape(n_cls, h * w).T
    idx = torch.arange(h * w, device=key0.device)
    rows, cols = idx // w, idx % w
    queue: deque = deque(maxlen=n_last_frames)  # (keys, soft labels) of the previous frames, oldest first
    for t, feat in enumerate(frames, start=1):
        query = _patch_tokens(feat, (h, w, c), t)
        keys = torch.cat([key0] + [k for k, _ in queue])
        labels = torch.cat([labels0] + [s for _, s in queue])
        soft = _propagate_frame(query, keys, labels, 1 + len(queue), h * w, rows, cols, topk, temperature,
                                neighborhood, query_chunk)
        if n_last_frames > 0:
            queue.append((query, soft))
        yield soft.T.reshape(n_cls, h, w)


def propagate_video(frame_feats: Sequence[torch.Tensor], first_labels: torch.Tensor, n_last_frames: int = 7,
                    topk: int = 5, temperature: float = 0.1, neighborhood: int = 12, *,
                    query_chunk: int | None = None) -> list[torch.Tensor]:
    """Soft label maps of frames 1 … T-1 propagated from frame 0's labels (DINO's label propagation).

    ``frame_feats``: T tensors (h, w, C), patch features of each frame (not normalised; L2-normalised here).
    ``first_labels``: (K, h, w) one-hot labels of frame 0 at patch resolution (background is one of the K).
    Context of frame t: frame 0 (its one-hot labels) and frames max(1, t-n_last_frames) … t-1 (their soft maps).
    ``neighborhood``: window half-size in patches (0: every context patch may vote). ``query_chunk``: queries per
    chunk (default: sized to keep each affinity chunk near 2^24 entries).
    Returns T-1 float32 tensors (K, h, w) at patch resolution (before any upsampling); each sums to 1 over K
    when ``first_labels`` is one-hot."""
    return list(iter_propagation(frame_feats, first_labels, n_last_frames, topk, temperature, neighborhood,
                                 query_chunk=query_chunk))
