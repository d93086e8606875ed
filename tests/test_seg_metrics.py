"""SegmentationMeter (eval/dense/metrics.py) against a float64 numpy re-derivation of mmsegmentation's IoUMetric
and hand-worked cases."""
import math

import numpy as np
import pytest
import torch

from sere_scale.eval.dense.metrics import SegmentationMeter


def reference(preds, targets, K, ignore):
    """Per-class areas summed over the data set from the definition, then the metrics, in float64."""
    inter, area_p, area_l = np.zeros(K), np.zeros(K), np.zeros(K)
    for p, t in zip(preds, targets):
        v = t != ignore
        p, t = p[v], t[v]
        for c in range(K):
            inter[c] += np.sum((p == c) & (t == c))
            area_p[c] += np.sum(p == c)
            area_l[c] += np.sum(t == c)
    union = area_p + area_l - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(area_l > 0, inter / area_l, np.nan)
    return {"mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "aAcc": inter.sum() / area_l.sum(), "IoU": iou,
            "Acc": acc}


def test_random_maps_against_reference():
    rng = np.random.default_rng(0)
    K, ignore = 6, 255
    preds, targets = [], []
    m = SegmentationMeter(K, ignore)
    for _ in range(5):
        t = rng.integers(0, K - 1, size=(2, 9, 11))  # class K-1 never in the labels
        t[rng.random(t.shape) < 0.2] = ignore
        p = np.where(rng.random(t.shape) < 0.6, np.where(t == ignore, 0, t), rng.integers(0, K - 2, size=t.shape))
        preds += list(p)
        targets += list(t)
        m.update(torch.from_numpy(p), torch.from_numpy(t))
    got, want = m.compute(), reference(preds, targets, K, ignore)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    np.testing.assert_allclose(np.array(got["IoU"]), want["IoU"], atol=1e-12)
    np.testing.assert_allclose(np.array(got["Acc"]), want["Acc"], atol=1e-12)
    assert math.isnan(got["IoU"][K - 1])  # in neither prediction nor label: undefined, left out of the mean


def test_hand_worked_with_ignored_pixel_and_absent_class():
    m = SegmentationMeter(3, ignore_index=255)
    m.update(torch.tensor([[0, 1], [1, 2]]), torch.tensor([[0, 0], [1, 255]]))  # the 2 lies on an ignored pixel
    r = m.compute()
    assert r["IoU"][:2] == [0.5, 0.5] and math.isnan(r["IoU"][2])
    assert r["Acc"][:2] == [0.5, 1.0] and math.isnan(r["Acc"][2])
    assert r["mIoU"] == 0.5 and r["mAcc"] == 0.75 and r["aAcc"] == pytest.approx(2 / 3)
    a = m.areas()
    assert a["intersection"].dtype == torch.int64 and a["pred"].tolist() == [1, 2, 0]


def test_class_only_predicted_counts_as_zero():
    m = SegmentationMeter(3)
    m.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    r = m.compute()
    assert r["IoU"][0] == 0.5 and math.isnan(r["IoU"][1]) and r["IoU"][2] == 0.0
    assert r["mIoU"] == 0.25 and r["mAcc"] == 0.5 and r["aAcc"] == 0.5


def test_batch_equals_one_by_one():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 4, size=(3, 5, 5)), rng.integers(0, 4, size=(3, 5, 5))
    a, b = SegmentationMeter(4), SegmentationMeter(4)
    a.update(torch.from_numpy(p), torch.from_numpy(t))
    for i in range(3):
        b.update(torch.from_numpy(p[i]), torch.from_numpy(t[i]))
    assert torch.equal(a.confusion, b.confusion)


def test_bad_values_named():
    m = SegmentationMeter(3, ignore_index=255)
    with pytest.raises(ValueError, match="target label 7"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="predicted class 3"):
        m.update(torch.tensor([3, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
