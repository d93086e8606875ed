"""Semantic-segmentation metrics with mmsegmentation's ``IoUMetric`` convention.

Per class ``c``, over the whole data set (int64 pixel counts, pixels whose target is ``ignore_index`` dropped):
intersection (pred == target == c), area of the prediction (pred == c), area of the label (target == c), union =
pred + label − intersection. IoU = intersection / union (NaN for a class with union 0: absent from both
prediction and label), Acc = intersection / label (NaN for label area 0); mIoU and mAcc are their NaN-means and
aAcc = Σ intersection / Σ label. All values are fractions (not %).
"""
from __future__ import annotations

import math

import torch


class SegmentationMeter:
    """Accumulates the per-class areas of (prediction, target) pairs; :meth:`compute` gives the metrics."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)  # [target, pred]

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add integer maps ``pred`` and ``target`` of one shape, (H, W) or (B, H, W). A target value outside
        ``[0, num_classes)`` that is not ``ignore_index``, or a prediction outside it, is a ValueError naming it."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("prediction and target must be integer tensors (class indices)")
        K = self.num_classes
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        bad = (target < 0) | (target >= K)
        if bad.any():
            raise ValueError(f"target label {int(target[bad][0])} is outside [0, {K}) and not the ignore index "
                             f"{self.ignore_index}")
        bad = (pred < 0) | (pred >= K)
        if bad.any():
            raise ValueError(f"predicted class {int(pred[bad][0])} is outside [0, {K})")
        self.confusion += torch.bincount(target * K + pred, minlength=K * K).reshape(K, K)

    def areas(self) -> dict:
        """int64 per-class ``intersection``, ``union``, ``pred`` and ``label`` areas accumulated so far."""
        inter = self.confusion.diagonal().clone()
        area_pred, area_label = self.confusion.sum(0), self.confusion.sum(1)
        return {"intersection": inter, "union": area_pred + area_label - inter, "pred": area_pred,
                "label": area_label}

    def compute(self) -> dict:
        """``mIoU``, ``aAcc``, ``mAcc`` (floats, fractions; NaN when nothing was counted) and per-class ``IoU`` and
        ``Acc`` lists (NaN for an undefined class)."""
        a = {k: v.double() for k, v in self.areas().items()}
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(a["union"] > 0, a["intersection"] / a["union"].clamp_min(1), nan)
        acc = torch.where(a["label"] > 0, a["intersection"] / a["label"].clamp_min(1), nan)
        total = a["label"].sum()
        return {"mIoU": _nanmean(iou), "aAcc": float(a["intersection"].sum() / total) if total > 0 else math.nan,
                "mAcc": _nanmean(acc), "IoU": iou.tolist(), "Acc": acc.tolist()}


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan
