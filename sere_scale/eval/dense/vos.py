"""Semi-supervised video object segmentation on DAVIS-2017 as DINO runs it (``eval_video_segmentation.py``):
frames → patch features → label propagation from the first annotation → indexed PNGs, one per frame, for
``davis.evaluate_davis`` to score.

Per frame: resized so the short side is ``short_side`` and the other side proportional, each side then floored to a
multiple of the patch size (DINO floors the long side to a multiple of 64); bilinear resize; ImageNet mean/std.
``feature_fn(frame (3, H, W)) -> (H/p, W/p, C)`` gives the last-layer patch tokens. The first annotation, resized
NEAREST to the patch grid, becomes K = max label + 1 one-hot channels (background included). Each propagated soft map
is upsampled bilinearly by the patch size, each channel whose max is > 0 min-max normalised (DINO's ``norm_mask``),
arg-maxed, resized NEAREST to the frame's original size and written as ``out_dir/<sequence>/<frame>.png`` with the
DAVIS palette; frame 0's PNG is the given annotation itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sere_scale.data.recipe import IMAGENET_MEAN, IMAGENET_STD
from sere_scale.eval.dense.davis_data import (annotation_paths, check_davis_root, frame_paths, read_label_png,
                                              sequence_names, write_label_png)
from sere_scale.eval.dense.propagation import iter_propagation

__all__ = ["resized_size", "load_frame", "labels_to_onehot", "norm_mask", "soft_to_labels", "propagate_and_write",
           "evaluate_sequences", "run_davis"]


def resized_size(height: int, width: int, patch_size: int, short_side: int = 480) -> tuple[int, int]:
    """(H, W) a frame is resized to: short side ``short_side``, long side ``short_side · long / short``, each
    floored to a multiple of ``patch_size`` (a square frame: both sides ``short_side``, floored)."""
    if short_side < patch_size:
        raise ValueError(f"short_side {short_side} is smaller than the patch size {patch_size}")
    short = short_side // patch_size * patch_size
    if height > width:
        return int(short_side * height / width // patch_size * patch_size), short
    return short, int(short_side * width / height // patch_size * patch_size)


def load_frame(path, patch_size: int, short_side: int = 480) -> tuple[torch.Tensor, tuple[int, int]]:
    """(normalised frame (3, H, W) float32, original (height, width)) of an RGB image file."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    size = resized_size(x.shape[1], x.shape[2], patch_size, short_side)
    if size != tuple(x.shape[1:]):  # bilinear without antialiasing, like DINO's cv2.resize
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, (rgb.shape[0], rgb.shape[1])


def labels_to_onehot(labels, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(K, h, w) float32 one-hot of an (H, W) integer label map resized NEAREST (PIL) to ``grid_hw``;
    K = max label + 1."""
    arr = np.asarray(labels, dtype=np.uint8)
    small = np.array(Image.fromarray(arr).resize((grid_hw[1], grid_hw[0]), Image.NEAREST))
    idx = torch.from_numpy(small).long()
    return F.one_hot(idx, int(arr.max()) + 1).permute(2, 0, 1).float()


def norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """DINO's ``norm_mask`` on (K, H, W): every channel whose max is > 0 becomes (x - min) / max(x - min)."""
    out = mask.clone()
    for c in range(mask.shape[0]):
        if mask[c].max() > 0:
            shifted = mask[c] - mask[c].min()
            out[c] = shifted / shifted.max()
    return out


def soft_to_labels(soft: torch.Tensor, patch_size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """(out_h, out_w) uint8 labels of a (K, h, w) soft map: bilinear ×patch_size, ``norm_mask``, argmax (first
    channel on ties), NEAREST resize to ``out_hw``."""
    up = F.interpolate(soft[None].float(), scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    labels = norm_mask(up).max(dim=0).indices.to(torch.uint8).cpu().numpy()
    return np.array(Image.fromarray(labels).resize((out_hw[1], out_hw[0]), Image.NEAREST))


def propagate_and_write(frames: Sequence, first_annotation, feature_fn: Callable[[torch.Tensor], torch.Tensor],
                        out_dir, patch_size: int, short_side: int = 480, *, sequence: str | None = None,
                        n_last_frames: int = 7, topk: int = 5, temperature: float = 0.1, neighborhood: int = 12,
                        device: torch.device | str | None = None) -> list[Path]:
    """Segment one sequence: ``frames`` are its image files in order (frame 0 first), ``first_annotation`` frame 0's
    label PNG (path) or (H, W) label array. Writes ``out_dir/<sequence>/<frame stem>.png`` for every frame
    (``sequence`` defaults to the frames' folder name) and returns the paths written. Frames are read and their
    features computed one at a time (``feature_fn`` is called under ``torch.no_grad``; ``device``: where the frame
    tensor is moved before it, default CPU)."""
    frames = [Path(p) for p in frames]
    if not frames:
        raise ValueError("no frames given")
    if isinstance(first_annotation, (str, Path)):
        ann_name, first = str(first_annotation), read_label_png(first_annotation)
    else:
        ann_name, first = "first_annotation", np.asarray(first_annotation)
    if first.ndim != 2 or first.size == 0 or first.min() < 0 or first.max() > 255:
        raise ValueError(f"{ann_name}: need a 2-D label map with labels in 0..255, got shape {first.shape}")
    folder = Path(out_dir) / (sequence or frames[0].parent.name)
    sizes: dict = {}

    def features():
        for i, p in enumerate(frames):
            x, orig = load_frame(p, patch_size, short_side)
            sizes[i] = orig
            if orig != sizes[0]:
                raise ValueError(f"{p}: size {orig} differs from the sequence's first frame {frames[0]} {sizes[0]}")
            if i == 0 and first.shape != orig:
                raise ValueError(f"first annotation {ann_name} has size {first.shape}, its frame {p} {orig}")
            with torch.no_grad():
                feat = feature_fn(x.to(device) if device is not None else x)
            grid = (x.shape[1] // patch_size, x.shape[2] // patch_size)
            if feat.dim() != 3 or tuple(feat.shape[:2]) != grid:
                raise ValueError(f"feature_fn on {p} ({tuple(x.shape)}) returned {tuple(feat.shape)}, "
                                 f"expected ({grid[0]}, {grid[1]}, C)")
            yield feat

    feats = features()
    feat0 = next(feats)
    onehot = labels_to_onehot(first, tuple(feat0.shape[:2]))
    written = [folder / f"{frames[0].stem}.png"]
    write_label_png(written[0], first)

    def all_feats():
        yield feat0
        yield from feats

    for t, soft in enumerate(iter_propagation(all_feats(), onehot, n_last_frames, topk, temperature, neighborhood),
                             start=1):
        written.append(folder / f"{frames[t].stem}.png")
        write_label_png(written[-1], soft_to_labels(soft, patch_size, sizes[t]))
    return written


def evaluate_sequences(davis_root, subset: str, feature_fn: Callable[[torch.Tensor], torch.Tensor], out_dir,
                       patch_size: int, short_side: int = 480, *, resolution: str = "480p", **propagation) -> list[str]:
    """Run ``propagate_and_write`` on every sequence of ImageSets/2017/<subset>.txt (frames from
    JPEGImages/<resolution>/<seq>, frame 0's annotation from Annotations/<resolution>/<seq>); returns the sequence
    names. Score the PNGs with ``davis.evaluate_davis(davis_root, out_dir, subset)``. ``propagation``: keyword
    arguments of ``propagate_and_write`` (n_last_frames, topk, temperature, neighborhood, device)."""
    root = check_davis_root(davis_root, subset, resolution)
    names = sequence_names(root, subset)
    for seq in names:
        jpgs = frame_paths(root, seq, resolution)
        anns = {p.stem: p for p in annotation_paths(root, seq, resolution)}
        if jpgs[0].stem not in anns:
            raise FileNotFoundError(f"sequence {seq}: no first-frame annotation "
                                    f"{root / 'Annotations' / resolution / seq / (jpgs[0].stem + '.png')} "
                                    f"for {jpgs[0]}")
        propagate_and_write(jpgs, anns[jpgs[0].stem], feature_fn, out_dir, patch_size, short_side, sequence=seq,
                            **propagation)
    return names


def run_davis(backbone_or_run, davis_root, out_dir, subset: str = "val", *, weights: str = "teacher",
              arch: str | None = None, short_side: int = 480, n_last_frames: int = 7, topk: int = 5,
              temperature: float = 0.1, neighborhood: int = 12, device: str = "cpu") -> dict:
    """Propagate every sequence of ``subset`` with the last-layer patch tokens of ``backbone_or_run`` (a ViT, or
    anything ``sere_scale.load_backbone`` reads: a run's teacher by default), write the PNGs to ``out_dir`` and
    score them (``davis.evaluate_davis``: the CSVs land in ``out_dir``). Returns the scores with ``protocol``;
    also written to ``out_dir/davis.json``."""
    import json
    import time

    from sere_scale.eval.dense.davis import evaluate_davis
    from sere_scale.eval.dense.features import patch_features, patch_size_of
    if isinstance(backbone_or_run, torch.nn.Module):
        model = backbone_or_run
    else:
        from sere_scale.models.source import load_backbone
        model = load_backbone(backbone_or_run, weights=weights, arch=arch)
    model = model.to(device).eval()
    patch = patch_size_of(model)

    def feature_fn(frame: torch.Tensor) -> torch.Tensor:
        return patch_features(model, frame[None])[0].permute(1, 2, 0)

    t0 = time.perf_counter()
    names = evaluate_sequences(davis_root, subset, feature_fn, out_dir, patch, short_side, n_last_frames=n_last_frames,
                               topk=topk, temperature=temperature, neighborhood=neighborhood, device=device)
    res = evaluate_davis(davis_root, out_dir, subset)
    res["protocol"] = {"name": "dino-label-propagation", "subset": subset, "sequences": len(names),
                       "short_side": short_side, "patch_size": patch, "n_last_frames": n_last_frames, "topk": topk,
                       "temperature": temperature, "neighborhood": neighborhood, "features": "last layer, CLS dropped",
                       "score": "DAVIS-2017 semi-supervised (J region IoU, F boundary, first/last frame excluded)"}
    res["seconds"] = round(time.perf_counter() - t0, 3)
    Path(out_dir, "davis.json").write_text(json.dumps(res, indent=1))
    return res
