"""``make demo``: pretrain a tiny ViT with iBOT+SERE on unlabelled scenes of the embedded digits (2 DDP ranks on
CPU), then print, for the trained teacher beside the same backbone at random init, the k-NN and linear-probe
accuracies on the digits, the segmentation mIoU on labelled scenes and the DAVIS J&F on clips (none of their
images is seen in pretraining), the run's health figures, and write pictures of what it learned
(docs/VISUALIZE.md) for a few validation images."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--data", default="demo_data")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("overrides", nargs="*")
    return ap


def add_parser(sub) -> None:
    p = _args(sub.add_parser("demo", help="pretrain a tiny ViT on scenes of the embedded digits and evaluate it "
                                          "(make demo)"))
    p.set_defaults(func=run)


def main(argv=None) -> int:
    return run(_args(argparse.ArgumentParser(description=__doc__)).parse_args(argv))


def run(args) -> int:

    from sere_scale.data.demo_data import write_digits, write_pretrain_scenes
    data = write_digits(args.data)
    pretrain = write_pretrain_scenes(data / "pretrain")  # an override data.path=... trains on other images
    from sere_scale.config.load import load_config
    cfg = load_config(args.config, [f"data.path={pretrain}", *args.overrides])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "sere_scale", "train", "--config", args.config, f"data.path={pretrain}", *args.overrides,
           "--move-old"]  # a second `make demo` moves the previous demo run aside (<output_dir>.old-N)
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"training failed with exit code {rc}", file=sys.stderr)
        return rc

    from sere_scale.eval.knn import knn_accuracy
    from sere_scale.eval.linear import linear_accuracy
    from sere_scale.models.load import load_teacher, resolve_checkpoint
    results, linear = {}, {}
    for name, rand in (("random-init", True), ("trained", False)):
        c, net = load_teacher(cfg.output_dir, random_init=rand)
        results[name] = knn_accuracy(net.backbone, str(data / "train"), str(data / "val"), c.eval.eval_size,
                                     c.eval.knn_k, c.eval.knn_t)
        key = {"checkpoint": str(resolve_checkpoint(cfg.output_dir)[0].resolve()), "random_init": rand}
        linear[name] = linear_accuracy(net.backbone, str(data / "train"), str(data / "val"), c.eval.eval_size,
                                       Path(cfg.output_dir) / "linear", key)
    print("\nk-NN accuracy on the digits validation split (teacher backbone, k=20, T=0.07):")
    for name, r in results.items():
        print(f"  {name:12s} top-1 {r['top1']:6.2f}%   top-5 {r['top5']:6.2f}%")
    gain = results["trained"]["top1"] - results["random-init"]["top1"]
    print(f"  SERE pretraining gain: {gain:+.2f} points")
    print("\nLinear-probe accuracy on the digits validation split (teacher backbone, frozen CLS features):")
    for name, r in linear.items():
        print(f"  {name:12s} top-1 {r['top1']:6.2f}%   top-5 {r['top5']:6.2f}%   (lr {r['lr']:g})")
    gain = linear["trained"]["top1"] - linear["random-init"]["top1"]
    print(f"  SERE pretraining gain: {gain:+.2f} points")
    dense_report(cfg, data)
    health_report(cfg)
    from sere_scale.viz.write import demo_report
    demo_report(cfg.output_dir, data / "val")
    return 0


def dense_report(cfg, data: Path) -> None:
    """Segmentation mIoU (nn and cached-linear probes) on the embedded digit scenes and DAVIS J&F on the embedded
    clips, for the trained teacher beside the same backbone at random init (docs/EVAL.md, "Dense evaluation")."""
    from sere_scale.data.demo_data import write_clips, write_scenes
    from sere_scale.eval.dense.segprobe import run_segprobe
    from sere_scale.eval.dense.vos import run_davis
    from sere_scale.models.load import load_teacher
    scenes, clips = write_scenes(data / "scenes"), write_clips(data / "clips")
    rows = {}
    for name, rand in (("random-init", True), ("trained", False)):
        _, net = load_teacher(cfg.output_dir, random_init=rand)
        seg = dict(num_classes=11, ignore_index=255, size=64)
        nn_ = run_segprobe(net.backbone, scenes, "nn", memory_size=10240, **seg)
        lin = run_segprobe(net.backbone, scenes, "linear-cached", iters=300, batch_size=16, warmup=30, **seg)
        vos = run_davis(net.backbone, clips, Path(cfg.output_dir) / f"davis_{name}", short_side=96)
        rows[name] = (100 * nn_["mIoU"], 100 * lin["mIoU"], 100 * vos["J&F-Mean"])
    print("\nDense evaluation (teacher patch tokens; scenes: 11 classes, 64 px; clips: 8 DAVIS-layout sequences):")
    print(f"  {'':12s} {'seg mIoU nn':>12s} {'seg mIoU linear':>16s} {'DAVIS J&F':>10s}")
    for name, (a, b, c) in rows.items():
        print(f"  {name:12s} {a:11.2f}% {b:15.2f}% {c:9.2f}%")
    gains = [t - r for t, r in zip(rows["trained"], rows["random-init"])]
    print("  SERE pretraining gain: " + ", ".join(f"{g:+.2f}" for g in gains) + " points")


def health_report(cfg) -> None:
    """The run's health figures at its last logged step, and any collapse event (docs/EVAL.md, collapse alarm)."""
    import json
    import math
    recs = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = [r for r in recs if "loss" in r][-1]
    events = [r for r in recs if r.get("event") == "collapse"]
    figures = []  # those the image loss logs: MoCo v3 has no teacher distribution (docs/EVAL.md, collapse alarm)
    if "teacher_entropy" in last:
        figures.append(f"teacher_entropy / ln K {last['teacher_entropy'] / math.log(cfg.image_loss.out_dim):.3f}")
    figures += [f"{k} {last[k]:.3f}" for k in ("loss_image_norm", "moco_acc", "feature_std") if k in last]
    print(f"\nTraining health at step {last['step']}: " + ", ".join(figures)
          + ("" if events else "; no collapse alarm"))
    for e in events:
        print(f"  collapse alarm: {e['kind']} from step {e.get('window_start')} ({e.get('figure')} "
              f"{e.get('value', float('nan')):.3f}); docs/EVAL.md lists the remedies")


if __name__ == "__main__":
    raise SystemExit(main())
