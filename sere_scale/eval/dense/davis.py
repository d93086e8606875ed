"""DAVIS-2017 semi-supervised scoring: region similarity J and boundary accuracy F, as the official toolkit
(davisvideochallenge/davis2017-evaluation: ``davis2017/{davis,results,metrics,utils,evaluation}.py`` and
``evaluation_method.py``) computes them.

Per sequence: the ground truth is every annotation PNG (sorted), void (255) set to 0 (counted as background; the
semi-supervised task passes no void mask to the metrics); the objects are 1 … max label of the FIRST annotation.
The first and the last frame are not scored; the result PNG of every other frame id is read from
``results_dir/<sequence>/<frame>.png``. A result label above the number of objects is an error; an object the
results never show scores as an empty mask.
Per object and frame: J = |R ∩ G| / |R ∪ G| (1 if the union is empty); F = boundary F-measure with a tolerance of
ceil(0.008 · image diagonal) pixels. Per object: mean, recall (fraction of frames > 0.5) and decay (mean of the first
quarter of the frames minus mean of the last). The global numbers average over all objects of all sequences.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sere_scale.eval.dense.davis_data import annotation_paths, check_davis_root, read_label_png, sequence_names

__all__ = ["jaccard", "seg2bmap", "dilate_disk", "boundary_f", "db_statistics", "score_sequence", "evaluate_davis",
           "GLOBAL_COLUMNS"]

GLOBAL_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")
VOID = 255


def jaccard(gt: np.ndarray, res: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty."""
    if gt.shape != res.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {res.shape}")
    gt, res = gt.astype(bool), res.astype(bool)
    union = np.count_nonzero(gt | res)
    return 1.0 if union == 0 else np.count_nonzero(gt & res) / union


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """Boundary map of a boolean mask (D. Martin's seg2bmap, as the toolkit calls it at full size): a pixel is on
    the boundary if it differs from its east, south or south-east neighbour (outside the image counts as 0); the
    last row compares with east only, the last column with south only, the bottom-right pixel is never boundary."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()


def dilate_disk(masks: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of (…, H, W) boolean maps by the disk {(i, j): i² + j² <= radius²}; outside is 0."""
    x = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))
    shape = x.shape
    x = x.reshape(-1, 1, *shape[-2:])
    out = F.conv2d(x, _disk(radius)[None, None], padding=radius) > 0.5
    return out.reshape(shape).numpy()


def boundary_radius(height: int, width: int, bound_th: float = 0.008) -> int:
    """Boundary tolerance in pixels: ``bound_th`` itself when >= 1, else ceil(bound_th · diagonal)."""
    return int(bound_th) if bound_th >= 1 else int(math.ceil(bound_th * math.hypot(height, width)))


def _f_from_boundaries(fg_b: np.ndarray, gt_b: np.ndarray, fg_dil: np.ndarray, gt_dil: np.ndarray) -> float:
    n_fg, n_gt = int(np.count_nonzero(fg_b)), int(np.count_nonzero(gt_b))
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.count_nonzero(fg_b & gt_dil) / n_fg
        recall = np.count_nonzero(gt_b & fg_dil) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def boundary_f(res: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """Boundary F-measure of the result mask ``res`` against ``gt`` (2-D boolean masks, same shape)."""
    return boundary_f_frames(res[None], gt[None], bound_th)[0]


def boundary_f_frames(res: np.ndarray, gt: np.ndarray, bound_th: float = 0.008, chunk: int = 8) -> np.ndarray:
    """Boundary F-measure of each frame of (n, H, W) boolean result and ground-truth masks."""
    if res.shape != gt.shape or res.ndim != 3:
        raise ValueError(f"need two (n, H, W) stacks of the same shape, got {res.shape} and {gt.shape}")
    radius = boundary_radius(*res.shape[1:], bound_th)
    out = np.zeros(len(res))
    for start in range(0, len(res), chunk):
        fg_b = np.stack([seg2bmap(m) for m in res[start:start + chunk]])
        gt_b = np.stack([seg2bmap(m) for m in gt[start:start + chunk]])
        fg_dil, gt_dil = dilate_disk(fg_b, radius), dilate_disk(gt_b, radius)
        for i in range(len(fg_b)):
            out[start + i] = _f_from_boundaries(fg_b[i], gt_b[i], fg_dil[i], gt_dil[i])
    return out


def db_statistics(values) -> tuple[float, float, float]:
    """(mean, recall, decay) of one object's per-frame values, as the toolkit's ``db_statistics``: recall is the
    fraction of values > 0.5; decay splits the frames at round(linspace(1, n, 5) + 1e-10) - 1 into four bins
    (bin i: ids[i] … ids[i+1], both ends included) and returns mean(bin 0) - mean(bin 3). NaNs are skipped."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"need a non-empty 1-D array of per-frame values, got shape {v.shape}")
    mean = float(np.nanmean(v))
    recall = float(np.nanmean(v > 0.5))
    # the toolkit casts ids to uint8 (wrapping past 256 frames, which no DAVIS sequence reaches); int64 here
    ids = (np.round(np.linspace(1, len(v), 5) + 1e-10) - 1).astype(np.int64)
    bins = [v[ids[i]:ids[i + 1] + 1] for i in range(4)]
    return mean, recall, float(np.nanmean(bins[0]) - np.nanmean(bins[3]))


def _load_sequence(davis_root: Path, results_dir: Path, sequence: str, resolution: str):
    """(ground truth (n, H, W) uint8 of the scored frames, void set to 0; results likewise; number of objects)."""
    paths = annotation_paths(davis_root, sequence, resolution)
    if len(paths) < 3:
        raise ValueError(f"sequence {sequence}: {len(paths)} annotation(s) in {paths[0].parent}; the first and the "
                         f"last frame are not scored, so at least 3 are needed")
    gt = []
    for p in paths:
        a = read_label_png(p)
        if gt and a.shape != gt[0].shape:
            raise ValueError(f"{p}: size {a.shape} differs from {paths[0]} {gt[0].shape}")
        gt.append(np.where(a == VOID, 0, a))
    n_objects = int(gt[0].max())
    res = []
    for p in paths[1:-1]:
        rp = results_dir / sequence / f"{p.stem}.png"
        if not rp.is_file():
            raise FileNotFoundError(f"result PNG not found: {rp} (sequence {sequence}, frame {p.stem}; every frame "
                                    f"but the first and the last is scored)")
        r = read_label_png(rp)
        if r.shape != gt[0].shape:
            raise ValueError(f"{rp}: size {r.shape} differs from the annotation {p} {gt[0].shape}")
        res.append(r)
    res = np.stack(res)
    if int(res.max()) > n_objects:
        raise ValueError(f"sequence {sequence}: results in {results_dir / sequence} hold label {int(res.max())} but "
                         f"the first annotation {paths[0]} has {n_objects} object(s)")
    return np.stack(gt[1:-1]), res, n_objects


def score_sequence(davis_root, results_dir, sequence: str, resolution: str = "480p") -> dict:
    """{k: (per-frame J (n,), per-frame F (n,))} for objects k = 1 … N of one sequence (scored frames only)."""
    gt, res, n_objects = _load_sequence(Path(davis_root), Path(results_dir), sequence, resolution)
    out = {}
    for k in range(1, n_objects + 1):
        g, r = gt == k, res == k  # an object the results never show: an empty mask (the toolkit's zero padding)
        out[k] = (np.array([jaccard(g[i], r[i]) for i in range(len(g))]), boundary_f_frames(r, g))
    return out


def _fmt(x: float) -> str:
    return "" if math.isnan(x) else "%.3f" % x  # pandas to_csv(float_format="%.3f"): NaN as an empty field


def _write_csvs(results_dir: Path, subset: str, summary: dict) -> None:
    with open(results_dir / f"global_results-{subset}.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(GLOBAL_COLUMNS)
        w.writerow([_fmt(summary[c]) for c in GLOBAL_COLUMNS])
    with open(results_dir / f"per-sequence_results-{subset}.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Sequence", "J-Mean", "F-Mean"])
        for name, m in summary["per_object"].items():
            w.writerow([name, _fmt(m["J-Mean"]), _fmt(m["F-Mean"])])


def evaluate_davis(davis_root, results_dir, subset: str = "val", resolution: str = "480p",
                   write_csv: bool = True) -> dict:
    """Score the result PNGs in ``results_dir`` on every sequence of ImageSets/2017/<subset>.txt (semi-supervised
    task). Returns {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay": fractions,
    "per_object": {"<sequence>_<k>": {"J-Mean", "F-Mean"}}} and (``write_csv``) writes
    ``global_results-<subset>.csv`` and ``per-sequence_results-<subset>.csv`` into ``results_dir`` as the toolkit's
    ``evaluation_method.py`` does."""
    root = check_davis_root(davis_root, subset, resolution, images=False)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder not found: {results_dir}")
    stats = {"J": [], "F": []}
    per_object = {}
    for seq in sequence_names(root, subset):
        for k, (j, f) in score_sequence(root, results_dir, seq, resolution).items():
            stats["J"].append(db_statistics(j))
            stats["F"].append(db_statistics(f))
            per_object[f"{seq}_{k}"] = {"J-Mean": stats["J"][-1][0], "F-Mean": stats["F"][-1][0]}
    if not per_object:
        raise ValueError(f"no object to score: the first annotations of the {subset} sequences hold no object")
    out = {}
    for m in ("J", "F"):
        arr = np.array(stats[m], dtype=np.float64)  # (objects, 3): mean, recall, decay
        out[f"{m}-Mean"], out[f"{m}-Recall"], out[f"{m}-Decay"] = (float(x) for x in arr.mean(axis=0))
    out["J&F-Mean"] = (out["J-Mean"] + out["F-Mean"]) / 2.0
    out = {c: out[c] for c in GLOBAL_COLUMNS}
    out["per_object"] = per_object
    if write_csv:
        _write_csvs(results_dir, subset, out)
    return out
