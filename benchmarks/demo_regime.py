"""Measure a demo training regime (issue 27): for each run folder, its health at the end of training (from
``metrics.jsonl``) and the gain of the trained teacher over the same backbone at random init on three probes:

* k-NN top-1 (DINO protocol, the run's ``eval.knn_k``/``knn_t``) and linear-probe top-1 on CLS features of the
  embedded digits (``write_digits``), exactly as ``make demo`` prints them;
* a dense patch probe on the embedded scenes (``write_scenes``): the teacher's last-layer (normed) patch tokens
  at the scene's own size, each patch labelled with the majority class of its mask pixels, a multinomial
  logistic regression fitted on the train scenes' patches (full batch, L-BFGS, standardised features); the
  figures are the patch mIoU over the 11 classes on the val scenes and the IoU of digit-vs-background (any digit
  class predicted where any digit is);
* DAVIS-style label propagation of the first-frame masks through the embedded clips (``write_clips``) with the
  package's DINO propagation (eval/dense/vos.py) on the same patch tokens: J&F-Mean.

Usage (from the repository root)::

    PYTHONPATH=$PWD python benchmarks/demo_regime.py RUN_DIR [RUN_DIR ...] [--digits DIR] [--scenes DIR]
        [--clips DIR] [--json OUT.jsonl]

Health figures: ``entropy_ratio`` = last logged ``teacher_entropy`` / ln K (1.0: the uniform collapse; near 0:
one-hot), ``max_ratio_2nd_half`` its largest value over the second half of the run, ``loss_image_norm`` and
``feature_std`` (normalised student CLS, ~1 spread, ~0 collapsed) at the last logged step, and ``train_s``
from the run's start event to its last logged step.

``demo_regime_2026-12-07.jsonl`` holds the figures of issue 27's regime search (15 runs; each line: run name, the
overrides of configs/demo_ibot.yaml (then named configs/demo.yaml), the figures), measured on a 2-core machine
shared with other jobs (load 10-14 for most runs: train_s is 2-4x the unloaded time; the baseline's 102 s was
measured at low load). ``demo_regime_2026-12-07b.jsonl``: the second search (collapse guards, pretraining on
scenes, MoCo v3), same format, overrides of configs/demo_ibot.yaml with ``data.path`` given in each line.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sere_scale.data.demo_data import write_clips, write_digits, write_scenes  # noqa: E402
from sere_scale.data.recipe import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from sere_scale.eval.dense.davis import evaluate_davis  # noqa: E402
from sere_scale.eval.dense.vos import evaluate_sequences  # noqa: E402
from sere_scale.eval.knn import knn_accuracy  # noqa: E402
from sere_scale.eval.linear import linear_accuracy  # noqa: E402
from sere_scale.models.load import load_teacher, resolve_checkpoint  # noqa: E402

N_CLASSES = 11


def health(run: Path) -> dict:
    """The run's end-of-training health figures (module docstring) from its metrics.jsonl and config.yaml."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r for r in rows if r.get("event") == "start")
    steps = [r for r in rows if "loss" in r and "step" in r]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    last = steps[-1]
    out = {"steps": last["step"], "train_s": round(last["time"] - start["time"], 1),
           "loss_image_norm": round(float(last.get("loss_image_norm", float("nan"))), 3),
           "feature_std": round(float(last["feature_std"]), 3)}
    if "teacher_entropy" in last:
        lnk = math.log(cfg["image_loss"]["out_dim"])
        half = [r["teacher_entropy"] / lnk for r in steps if r["step"] > last["step"] / 2]
        out.update(entropy_ratio=round(last["teacher_entropy"] / lnk, 3), max_ratio_2nd_half=round(max(half), 3))
    return out


def _scene_split(scenes: Path, split: str):
    """(normalised images (B, 3, H, W), masks (B, H, W) int64) of one split of a scenes root."""
    files = sorted((scenes / "images" / split).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no scene images under '{scenes / 'images' / split}'")
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = torch.stack([(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255
                      - mean) / std for f in files])
    m = torch.stack([torch.from_numpy(np.asarray(Image.open(scenes / "masks" / split / f.name)).astype(np.int64))
                     for f in files])
    return x, m


def patch_labels(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, h·w) majority class of each patch × patch block of (B, H, W) masks (255 = ignore, not counted;
    an all-ignore patch gets 255). Ties go to the smaller class."""
    B, H, W = masks.shape
    h, w = H // patch, W // patch
    blocks = masks[:, :h * patch, :w * patch].reshape(B, h, patch, w, patch).permute(0, 1, 3, 2, 4)
    blocks = blocks.reshape(B * h * w, patch * patch)
    counts = torch.zeros(blocks.shape[0], N_CLASSES + 1, dtype=torch.long)
    counts.scatter_add_(1, blocks.clamp(max=N_CLASSES), torch.ones_like(blocks))
    lab = counts[:, :N_CLASSES].argmax(1)
    lab[counts[:, :N_CLASSES].sum(1) == 0] = 255
    return lab.view(B, h * w)


@torch.no_grad()
def patch_features(backbone, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([backbone(x[i:i + batch])["patch"].float() for i in range(0, len(x), batch)])


def miou(pred: torch.Tensor, y: torch.Tensor) -> float:
    ious = []
    for c in range(N_CLASSES):
        inter = ((pred == c) & (y == c)).sum().item()
        union = ((pred == c) | (y == c)).sum().item()
        if union:
            ious.append(inter / union)
    return 100 * float(np.mean(ious))


def dense_probe(backbone, scenes: Path, patch: int, wd: float = 1e-3, iters: int = 100) -> dict:
    """Patch mIoU / accuracy (%) of a logistic regression on frozen patch tokens (train scenes → val scenes)."""
    (xtr, mtr), (xva, mva) = _scene_split(scenes, "train"), _scene_split(scenes, "val")
    ftr, fva = patch_features(backbone, xtr), patch_features(backbone, xva)
    ytr, yva = patch_labels(mtr, patch).flatten(), patch_labels(mva, patch).flatten()
    ftr, fva = ftr.flatten(0, 1), fva.flatten(0, 1)
    keep_tr, keep_va = ytr != 255, yva != 255
    ftr, ytr, fva, yva = ftr[keep_tr], ytr[keep_tr], fva[keep_va], yva[keep_va]
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    torch.manual_seed(0)
    lin = torch.nn.Linear(ftr.shape[1], N_CLASSES)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(ftr), ytr) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = lin(fva).argmax(1)
    fg_p, fg_y = pred > 0, yva > 0
    fg_iou = 100 * (fg_p & fg_y).sum().item() / max(1, (fg_p | fg_y).sum().item())
    return {"miou": round(miou(pred, yva), 2), "acc": round(100 * (pred == yva).float().mean().item(), 2),
            "fg_iou": round(fg_iou, 2),
            "fg_patches_val": int((yva > 0).sum()), "patches_val": int(len(yva))}


def davis_jf(backbone, clips: Path, patch: int) -> float:
    """J&F-Mean (%) of DINO label propagation (eval/dense/vos.py, its defaults) on the clips, at their own size."""
    side = Image.open(next((clips / "JPEGImages" / "480p").rglob("*.jpg"))).size[1]

    def feature_fn(x):
        out = backbone(x[None])
        h, w = out["grid"]
        return out["patch"][0].reshape(h, w, -1)

    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        evaluate_sequences(clips, "val", feature_fn, tmp, patch, short_side=side)
        return round(100 * evaluate_davis(clips, tmp, "val", write_csv=False)["J&F-Mean"], 2)


def measure(run: Path, digits: Path, scenes: Path, clips: Path) -> dict:
    res = {"run": str(run), **health(run)}
    ckpt = str(resolve_checkpoint(run)[0].resolve())
    for name, rand in (("random", True), ("trained", False)):
        cfg, net = load_teacher(run, random_init=rand)
        bb = net.backbone
        size = cfg.eval.eval_size
        res[f"knn_{name}"] = round(knn_accuracy(bb, str(digits / "train"), str(digits / "val"), size,
                                                cfg.eval.knn_k, cfg.eval.knn_t)["top1"], 2)
        with tempfile.TemporaryDirectory() as tmp:
            res[f"linear_{name}"] = round(linear_accuracy(bb, str(digits / "train"), str(digits / "val"), size, tmp,
                                                          {"checkpoint": ckpt, "random_init": rand})["top1"], 2)
        d = dense_probe(bb, scenes, bb.vit.patch_embed.patch_size[0])
        res[f"dense_miou_{name}"], res[f"dense_fg_iou_{name}"] = d["miou"], d["fg_iou"]
        res[f"davis_jf_{name}"] = davis_jf(bb, clips, bb.vit.patch_embed.patch_size[0])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--digits", type=Path, default=Path("demo_data"))
    ap.add_argument("--scenes", type=Path, default=Path("demo_data_scenes"))
    ap.add_argument("--clips", type=Path, default=Path("demo_data_clips"))
    ap.add_argument("--json", type=Path, help="append one JSON line per run here")
    args = ap.parse_args(argv)
    write_digits(args.digits)
    write_scenes(args.scenes)
    write_clips(args.clips)
    torch.set_num_threads(1)
    for run in args.runs:
        res = measure(run, args.digits, args.scenes, args.clips)
        print(json.dumps(res), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
