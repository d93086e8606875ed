"""Segmentation probes of a frozen backbone on a segmentation data set: one call, one result dict.

``run_segprobe(backbone_or_run, data_root, method=...)`` with ``method``:

* ``"linear"`` — BatchNorm + 1×1 conv head trained on augmented crops (linear_probe.py; iBOT / dinov2 protocol);
* ``"linear-cached"`` — the same head on the cached maps of the resized whole images (no augmentation; faster);
* ``"nn"`` — dense nearest-neighbour retrieval from a memory bank of training patches (nn_probe.py; Hummingbird).

The data set's layout (VOC, ADE20K, Cityscapes, generic) is found from the folder (layouts.py); images are resized
to short side ``size`` and scored at their labels' own size with mmsegmentation's IoU convention (metrics.py).
The result holds mIoU, aAcc, mAcc (fractions), per-class IoU and Acc (None where undefined), ``protocol`` (its
name and every setting that shaped the number), ``data`` and ``seconds``; with ``out`` it is also written to
``out/segprobe.json``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from sere_scale.eval.dense.features import patch_features, patch_size_of, unwrap_vit
from sere_scale.eval.dense.layouts import find_dataset
from sere_scale.eval.dense.linear_probe import (cache_features, linear_evaluate, train_linear,
                                                train_linear_cached)
from sere_scale.eval.dense.metrics import SegmentationMeter
from sere_scale.eval.dense.nn_probe import (DEFAULT_K, DEFAULT_MEMORY, DEFAULT_TEMPERATURE, build_bank,
                                            nn_evaluate)

METHODS = ("linear", "linear-cached", "nn")


def _backbone(backbone_or_run, arch: Optional[str], weights: str = "teacher") -> nn.Module:
    if isinstance(backbone_or_run, nn.Module):
        return backbone_or_run
    from sere_scale.models.source import load_backbone
    return load_backbone(backbone_or_run, weights=weights, arch=arch)


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def run_segprobe(backbone_or_run: Union[nn.Module, str, Path], data_root, method: str = "linear", size: int = 512,
                 crop: Optional[int] = None, layers: int = 1, iters: int = 40_000, batch_size: int = 16,
                 memory_size: int = DEFAULT_MEMORY, num_classes: Optional[int] = None,
                 ignore_index: Optional[int] = None, out=None, device="cpu", *, arch: Optional[str] = None,
                 k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE, lr: float = 1e-3,
                 weight_decay: float = 1e-4, warmup: int = 1500, schedule: str = "poly", inference: str = "whole",
                 stride: Optional[int] = None, seed: int = 0, num_workers: int = 0, weights: str = "teacher",
                 val_root=None) -> dict:
    """Train (or build) the probe on the ``train`` split of ``data_root`` and score the ``val`` split.

    ``backbone_or_run``: a ViTBackbone / timm VisionTransformer, or anything ``sere_scale.load_backbone`` reads
    (run / checkpoint folder: its EMA teacher, or ``weights="student"``; exported timm folder; weight file with
    ``arch``; ``hf-hub:``).
    ``val_root``: where the ``val`` split is (default ``data_root``).
    ``crop`` (default ``size``): training crops of ``linear`` and the windows of ``inference="slide"``
    (``stride`` default 2/3 crop)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got '{method}'")
    t0 = time.perf_counter()
    model = _backbone(backbone_or_run, arch, weights).to(device).eval()
    vit, patch = unwrap_vit(model), patch_size_of(model)
    channels = vit.embed_dim * layers
    train_ds = find_dataset(data_root, "train", num_classes, ignore_index)
    val_ds = find_dataset(val_root or data_root, "val", num_classes, ignore_index)
    crop = int(crop or size)

    def features_fn(x):
        return patch_features(model, x, layers)

    meter = SegmentationMeter(val_ds.num_classes, val_ds.ignore_index)
    settings = {"size": size, "layers": layers, "patch_size": patch, "seed": seed}
    if method == "nn":
        bank = build_bank(features_fn, patch, train_ds, size, memory_size, seed, device, num_workers)
        t_fit = time.perf_counter()
        nn_evaluate(features_fn, patch, bank, val_ds, size, meter, k, temperature, device, num_workers)
        protocol = {"name": "hummingbird-nn", **settings, "memory_size": memory_size, "bank_patches": len(bank),
                    "k": k, "temperature": temperature, "sampling": "rare-class-first (open-hummingbird-eval)"}
    else:
        train = {"iters": iters, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                 "warmup": min(warmup, iters // 2), "schedule": schedule, "optimizer": "AdamW"}
        if method == "linear":
            head = train_linear(features_fn, patch, channels, train_ds, size, crop, iters, batch_size, lr,
                                weight_decay, warmup, schedule, seed, device, num_workers)
            train.update(crop=crop, augmentation="random-resized-crop (area 0.25-1, aspect 3/4-4/3) + flip")
        else:
            maps, labels = cache_features(features_fn, train_ds, size, device, num_workers)
            head = train_linear_cached(maps, labels, patch, train_ds.num_classes, train_ds.ignore_index, iters,
                                       batch_size, lr, weight_decay, warmup, schedule, seed, device)
            del maps, labels
            train.update(augmentation="none (cached maps of the resized images)")
        t_fit = time.perf_counter()
        linear_evaluate(features_fn, head, patch, val_ds, size, meter, inference, crop, stride, device, num_workers)
        infer = {"inference": inference}
        if inference == "slide":
            infer.update(window=crop, stride=stride or max(1, (2 * crop) // 3))
        protocol = {"name": method, **settings, **train, **infer, "head": "BatchNorm2d + 1x1 conv"}
    t1 = time.perf_counter()
    res = meter.compute()
    res["protocol"] = protocol
    res["data"] = {"layout": train_ds.name, "root": str(train_ds.root), "train_split": train_ds.split,
                   "n_train": len(train_ds), "val_split": val_ds.split, "n_val": len(val_ds),
                   "num_classes": val_ds.num_classes, "ignore_index": val_ds.ignore_index}
    res["seconds"] = {"fit": round(t_fit - t0, 3), "evaluate": round(t1 - t_fit, 3)}
    res = _json_safe(res)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "segprobe.json").write_text(json.dumps(res, indent=1))
    return res


def dense_during_training(cfg, engine, step: int, info, teacher_state=None) -> dict:
    """The training loop's hook (``eval.dense_every`` > 0): at the first logged step at or after each multiple of
    ``dense_every``, the nearest-neighbour probe's mIoU (in %, like ``knn_top1``) of the teacher backbone, with
    the ``train`` split of ``eval.dense_train_path`` as the memory bank (``eval.dense_memory_size`` patches) and
    the ``val`` split of ``eval.dense_val_path`` (default: the same root) as the queries, images at short side
    ``eval.dense_size`` (default ``eval.eval_size``). As the k-NN hook: every rank calls it (gathering the
    teacher may be collective), rank 0 alone evaluates, the model's random streams are left untouched."""
    from sere_scale.eval.invariance import on_teacher_at
    e = cfg.eval

    def measure(backbone) -> dict:
        res = run_segprobe(backbone, e.dense_train_path, "nn", e.dense_size or e.eval_size or cfg.data.global_size,
                           memory_size=e.dense_memory_size, num_classes=e.dense_num_classes or None,
                           ignore_index=e.dense_ignore_index if e.dense_num_classes else None, device=info.device,
                           val_root=e.dense_val_path or None)
        return {"dense_miou": 100.0 * res["mIoU"] if res["mIoU"] is not None else float("nan")}
    return on_teacher_at(cfg, engine, step, e.dense_every, info, teacher_state, measure)
