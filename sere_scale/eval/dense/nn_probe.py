"""Dense nearest-neighbour retrieval ("Hummingbird" in-context segmentation; Balažević et al., NeurIPS 2023, as
open-hummingbird-eval implements it), exact and in pure PyTorch.

* **Memory bank.** Each training image (short side resized to ``size``, mask with nearest neighbours, padded to a
  multiple of the patch) gives its patch features, L2-normalised, each with its patch's class histogram: the
  fraction of the patch's non-ignored pixels in each class. Patches without a valid pixel (all ignored or
  padding) are never stored. ``memory_size // n_images`` patches are kept per image (all of them when it has
  fewer), chosen as open-hummingbird-eval does: a class's frequency is the number of the image's valid patches
  that contain it; a patch scores the sum of the frequencies of the classes it contains, times an independent
  U(0, 1) draw; the lowest scores are kept — patches of the image's rare classes first. The draws come from one
  ``torch.Generator`` seeded with ``seed`` (the bank is the same for the same data, model and seed).
  (open-hummingbird-eval relabels ignored pixels as background and draws training crops with augmentations;
  here ignored pixels are dropped and the bank sees each whole resized image once.)
* **Retrieval.** Each query patch (L2-normalised) takes its ``k`` = 30 nearest bank patches by cosine similarity
  ``s``; its class scores are Σ softmax(s / 0.02) · histogram over those neighbours (K, h, w), upsampled
  bilinearly to the label size, and the argmax is the prediction. The top-k is exact and computed in chunks of
  queries × bank rows with a running merge, so the working memory is bounded by the chunk sizes whatever the bank
  size (benchmarks/dense_eval.py measures it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sere_scale.eval.dense.features import ResizedPairs, iterate, pad_to_multiple, scores_to_label_size

DEFAULT_MEMORY = 102_400
DEFAULT_K = 30
DEFAULT_TEMPERATURE = 0.02


@torch.no_grad()
def chunked_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, query_chunk: int = 1024,
                 bank_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of ``queries @ bank.T`` per query: (values, indices), each (Q, min(k, N)), best first.
    Peak extra memory ~ query_chunk × (bank_chunk + 2k) scores."""
    N = bank.shape[0]
    if N == 0:
        raise ValueError("the memory bank is empty")
    k = min(k, N)
    vals, idxs = [], []
    for q0 in range(0, queries.shape[0], query_chunk):
        q = queries[q0:q0 + query_chunk]
        best_v = torch.full((q.shape[0], 0), float("-inf"), dtype=q.dtype, device=q.device)
        best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
        for b0 in range(0, N, bank_chunk):
            s = q @ bank[b0:b0 + bank_chunk].T
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            del s
            cand_v, cand_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + b0], 1)
            top_v, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1)
            best_v, best_i = top_v, cand_i.gather(1, pos)
        vals.append(best_v)
        idxs.append(best_i)
    return torch.cat(vals), torch.cat(idxs)


def patch_histograms(labels: torch.Tensor, patch: int, num_classes: int, ignore_index: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Class histograms (h·w, K) of the patches of a label map (H, W) (padded here with ``ignore_index`` to a
    multiple of ``patch``): the fraction of each patch's non-ignored pixels in each class; and a bool (h·w,) mask
    of the patches with at least one valid pixel (rows of the others are zero)."""
    lab = pad_to_multiple(labels[None].long(), patch, value=ignore_index)[0]
    lab = torch.where(lab == ignore_index, num_classes, lab)  # one extra, dropped, column for ignored pixels
    h, w = lab.shape[0] // patch, lab.shape[1] // patch
    onehot = F.one_hot(lab, num_classes + 1)[..., :num_classes]
    counts = onehot.reshape(h, patch, w, patch, num_classes).sum((1, 3)).reshape(h * w, num_classes).float()
    n = counts.sum(1, keepdim=True)
    return counts / n.clamp_min(1), n[:, 0] > 0


def sample_patches(hist: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``n`` rows of ``hist`` (valid patches of one image, (P, K)) favouring rare classes (the rule of
    the module docstring); all rows (in order) when P ≤ n."""
    P = hist.shape[0]
    if P <= n:
        return torch.arange(P)
    present = (hist > 0).double()
    score = present @ present.sum(0)  # Σ over the patch's classes of the number of patches containing the class
    score = score * torch.rand(P, generator=generator, dtype=torch.float64)
    return score.topk(n, largest=False).indices


class PatchBank:
    """L2-normalised features (N, C) and class histograms (N, K) of the sampled training patches."""

    def __init__(self, features: torch.Tensor, hists: torch.Tensor):
        self.features, self.hists = features, hists

    def __len__(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def soft_labels(self, queries: torch.Tensor, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                    query_chunk: int = 1024, bank_chunk: int = 16384) -> torch.Tensor:
        """Class scores (Q, K) of L2-normalised ``queries``: Σ softmax(cos / temperature) · histogram over each
        query's ``k`` nearest bank patches."""
        out = []
        for q0 in range(0, queries.shape[0], query_chunk):  # the (chunk, k, K) gathered histograms stay bounded
            sim, idx = chunked_topk(queries[q0:q0 + query_chunk], self.features, k, query_chunk, bank_chunk)
            weights = torch.softmax(sim.float() / temperature, dim=1)
            out.append(torch.einsum("qk,qkc->qc", weights, self.hists[idx].float()))
        return torch.cat(out)


@torch.no_grad()
def build_bank(features_fn, patch: int, ds, size: int, memory_size: int = DEFAULT_MEMORY, seed: int = 0,
               device="cpu", num_workers: int = 0) -> PatchBank:
    """The memory bank of the training split ``ds`` (a :class:`~.layouts.SegDataset`); ``features_fn`` maps
    normalised images (1, 3, H, W) to patch maps (1, C, h, w)."""
    per_image = max(1, memory_size // len(ds))
    g = torch.Generator().manual_seed(seed)
    feats, hists, n = None, None, 0
    for x, lab, _, i in iterate(ResizedPairs(ds, size), num_workers, f"segmentation data '{ds.root}'"):
        f = features_fn(x[None].to(device))[0]
        C, h, w = f.shape
        hist, valid = patch_histograms(lab, patch, ds.num_classes, ds.ignore_index)
        if hist.shape[0] != h * w:
            raise RuntimeError(f"feature grid {h}x{w} does not match the label grid of '{ds.items[i][1]}'")
        keep = valid.nonzero()[:, 0]
        keep = keep[sample_patches(hist[keep], per_image, g)]
        if feats is None:  # preallocated: no concatenation copy of the whole bank
            feats = torch.empty(per_image * len(ds), C, device=device)
            hists = torch.empty(per_image * len(ds), ds.num_classes, device=device)
        m = keep.numel()
        feats[n:n + m] = F.normalize(f.reshape(C, h * w).T[keep.to(f.device)], dim=1)
        hists[n:n + m] = hist[keep].to(device)
        n += m
    if not n:
        raise ValueError(f"no patch of '{ds.root}' ({ds.split}) has a labelled pixel: the memory bank is empty")
    return PatchBank(feats[:n].clone(), hists[:n].clone())


@torch.no_grad()
def nn_evaluate(features_fn, patch: int, bank: PatchBank, ds, size: int, meter, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, device="cpu", num_workers: int = 0) -> None:
    """Predict every image of the validation split ``ds`` from ``bank`` and add it to ``meter`` at the label's own
    size."""
    for x, _, lab, i in iterate(ResizedPairs(ds, size), num_workers, f"segmentation data '{ds.root}'"):
        f = features_fn(x[None].to(device))[0]
        C, h, w = f.shape
        q = F.normalize(f.reshape(C, h * w).T, dim=1)
        scores = bank.soft_labels(q, k, temperature).T.reshape(1, -1, h, w)
        scores = scores_to_label_size(scores, patch, tuple(x.shape[-2:]), tuple(lab.shape))
        try:
            meter.update(scores[0].argmax(0).cpu(), lab)
        except ValueError as e:
            raise ValueError(f"'{ds.items[i][1]}': {e}") from None
