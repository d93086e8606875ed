"""Full multi-crop throughput: GPUMultiCrop on a device vs the CPU MultiCrop on one core, same inputs.

Inputs: generated JPEGs of ImageNet's common sizes (500×375, 375×500, 500×333), quality 90, held in memory as
encoded bytes. Both sides decode and produce the full recipe (default 2×224 + 10×96, photometric on).

    python benchmarks/gpu_multicrop.py --device cuda --batch 256            # GPU + CPU baseline
    python benchmarks/gpu_multicrop.py --device cpu --batch 32 --iters 2    # what a CPU-only machine can say

``--train-rate R`` (images/s of the training step alone on that device) adds the data-wait arithmetic: CPU
cores needed to feed R with the CPU MultiCrop, and the share of each step that the device augmentation takes.
Prints one JSON object (also written to ``--out``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import time

import numpy as np
import torch
from PIL import Image

from sere_scale.data.gpu_multicrop import GPUMultiCrop
from sere_scale.data.multicrop import MultiCrop

SIZES = [(500, 375), (375, 500), (500, 333)]


def make_jpegs(n: int, seed: int = 0, quality: int = 90) -> list:
    """Photo-like content: smooth colour fields, edges and noise (so the entropy coder has real work)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        W, H = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(20, 80) + rng.uniform(0, 6)) * 60 + rng.uniform(60, 190)
                         + np.cos(yy / rng.uniform(20, 80)) * 40 for _ in range(3)], -1)
        for _ in range(6):
            x0, y0 = rng.integers(0, W - 50), rng.integers(0, H - 50)
            base[y0:y0 + rng.integers(20, 150), x0:x0 + rng.integers(20, 150)] += rng.uniform(-80, 80, 3)
        base += rng.normal(0, 8, base.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class Timer:
    """Wall and process CPU time: on a shared machine CPU time is the fair per-core figure."""

    def __init__(self, sync=lambda: None):
        self.sync = sync

    def __enter__(self):
        self.sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, n: int, prefix: str = "") -> dict:
        return {f"{prefix}images_per_s": n / self.wall, f"{prefix}images_per_cpu_s": n / self.cpu}


def cpu_rate(jpegs: list, args) -> dict:
    """Images/s of decode (PIL) + MultiCrop on one core (one thread)."""
    torch.set_num_threads(1)
    mc = MultiCrop(args.global_size, args.local_size, args.n_global, args.n_local)
    random.seed(0)
    for j in jpegs[:2]:
        mc(Image.open(io.BytesIO(j)).convert("RGB"))
    with Timer() as t:
        for j in jpegs[: args.cpu_images]:
            mc(Image.open(io.BytesIO(j)).convert("RGB"))
    return t.rates(args.cpu_images)


def device_rates(jpegs: list, args) -> dict:
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # per-core figure, comparable with the CPU MultiCrop
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    mc = GPUMultiCrop(args.global_size, args.local_size, args.n_global, args.n_local, device=dev)
    batches = [jpegs[i:i + args.batch] for i in range(0, len(jpegs) - args.batch + 1, args.batch)]
    g = torch.Generator().manual_seed(0)
    for b in batches[:1] * args.warmup:
        mc(b, g)
    n = args.iters * args.batch
    with Timer(sync) as t:
        for k in range(args.iters):
            mc(batches[k % len(batches)], g)
    res = t.rates(n)
    from sere_scale.data.decode import decode_images
    with Timer(sync) as t:
        for k in range(args.iters):
            decode_images(batches[k % len(batches)], dev)
    res.update(t.rates(n, "decode_only_"), n_fallback=mc.n_fallback)
    if dev.type == "cuda":
        res["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        res["gpu"] = torch.cuda.get_device_name()
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=512, help="distinct generated JPEGs")
    ap.add_argument("--cpu-images", type=int, default=48, help="images timed for the CPU baseline (0: skip)")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=96)
    ap.add_argument("--n-global", type=int, default=2)
    ap.add_argument("--n-local", type=int, default=10)
    ap.add_argument("--train-rate", type=float, default=None, help="images/s of the training step alone")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    jpegs = make_jpegs(max(args.images, args.batch, args.cpu_images))
    res = {"command": "python benchmarks/gpu_multicrop.py " + " ".join(argv or __import__("sys").argv[1:]),
           "host": platform.node(), "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "load_average": os.getloadavg(),
           "torch": torch.__version__, "device": args.device, "batch": args.batch,
           "recipe": f"{args.n_global}x{args.global_size} + {args.n_local}x{args.local_size}",
           "mean_jpeg_kib": sum(map(len, jpegs)) / len(jpegs) / 1024,
           "device_side": device_rates(jpegs, args)}
    if args.cpu_images:
        res["cpu_multicrop_one_core"] = cpu_rate(jpegs, args)
        per_core = res["cpu_multicrop_one_core"]["images_per_cpu_s"]
        # on a GPU its wall rate counts; GPUMultiCrop on the CPU device is compared per CPU second as well
        key = "images_per_s" if args.device.startswith("cuda") else "images_per_cpu_s"
        res["device_vs_one_core"] = res["device_side"][key] / per_core
    if args.train_rate:
        r, d = args.train_rate, res["device_side"]["images_per_s"]
        per_core = res.get("cpu_multicrop_one_core", {}).get("images_per_cpu_s", float("nan"))
        res["data_wait"] = {
            "cpu_cores_to_feed_train_rate": r / per_core,
            "device_augment_share_of_step": (1 / d) / (1 / r + 1 / d),
            "throughput_with_device_augment": 1 / (1 / r + 1 / d)}
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
