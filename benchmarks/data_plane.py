"""Data-plane benchmark (issue 8): conversion and multi-crop loading throughput on ImageNet-like JPEGs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_plane.py [--n 300] [--rounds 3] [--json out.json]

Conversion: ``sere-prep`` (1 and 2 processes; ``--check`` scan, draft, full) against a plain single-process
``webdataset.ShardWriter`` loop that decodes every image fully (PIL) and writes jpg + cls. Loading (one core):
decode + 2×224 + 10×96 multi-crop with jitter, grayscale, blur, solarize: the DINO/iBOT torchvision + PIL
pipeline vs ``MultiCrop`` vs ``FastMultiCrop``, plus the whole ``ShardLoader`` (tar reading, masks, collate).
Rounds are interleaved and the best round of each is reported. Every figure is given per wall-clock second and
per CPU second (this process plus its reaped children): on a shared machine the CPU-second figures are the
per-core throughputs, the wall-clock ones show scaling with processes only when the machine is otherwise idle.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def imagenet_like(i: int, w: int = 500, h: int = 375) -> bytes:
    """~110 KB quality-90 JPEG: smooth colour gradients plus noise."""
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 6.28, 3)
    base = np.stack([127 + 100 * np.sin(x / (40 + 20 * c) + y / (60 + 10 * c) + a[c]) for c in range(3)], -1)
    img = np.clip(base + rng.normal(0, 27, (h, w, 3)), 0, 255).astype(np.uint8)
    b = io.BytesIO()
    Image.fromarray(img).save(b, "JPEG", quality=90)
    return b.getvalue()


def make_tree(root: Path, n: int, classes: int = 10) -> list[tuple[Path, int]]:
    items = []
    for i in range(n):
        c = i % classes
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"n{c:08d}_{i}.JPEG"
        p.write_bytes(imagenet_like(i))
        items.append((p, c))
    return items


class Clock:
    """Wall-clock and CPU seconds (self + reaped children) of a block."""

    def __enter__(self):
        self.w, self.c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.w, self._cpu() - self.c

    @staticmethod
    def _cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ---- conversion --------------------------------------------------------------------------------------------------
def plain_shardwriter(items, out: Path) -> Clock:
    import webdataset as wds
    out.mkdir(parents=True, exist_ok=True)
    with Clock() as clk, wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, (p, c) in enumerate(items):
            data = p.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB")  # full decode, as a plain checking converter does
            sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": c})
    return clk


def ours(src: Path, out: Path, workers: int, check: str) -> Clock:
    from data_prep.convert import ConvertOptions, convert
    with Clock() as clk:
        # fsync off like the plain loop (on by default: one fsync per shard and per record, ~10 ms each here)
        convert(ConvertOptions(str(src), str(out), shard_size=25, workers=workers, check=check, progress=False,
                               fsync=False))
    return clk


# ---- multi-crop ------------------------------------------------------------------------------------------------------
def dino_pipeline():
    """DINO's DataAugmentationDINO (global 224 ×2, local 96 ×10), torchvision + PIL."""
    from torchvision import transforms as T

    class GaussianBlur:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            if random.random() > self.p:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    class Solarization:
        def __init__(self, p):
            self.p = p

        def __call__(self, img):
            return ImageOps.solarize(img) if random.random() < self.p else img

    flip_jitter = T.Compose([T.RandomHorizontalFlip(p=0.5), T.RandomApply(
        [T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bic = T.InterpolationMode.BICUBIC
    g1 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bic), flip_jitter, GaussianBlur(1.0),
                    norm])
    g2 = T.Compose([T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bic), flip_jitter, GaussianBlur(0.1),
                    Solarization(0.2), norm])
    loc = T.Compose([T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bic), flip_jitter, GaussianBlur(0.5),
                     norm])

    def run(data: bytes):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return [g1(img), g2(img)] + [loc(img) for _ in range(10)]
    return run


def timed(fn, datas) -> Clock:
    random.seed(0)
    torch.manual_seed(0)
    with Clock() as clk:
        for d in datas:
            fn(d)
    return clk


def summary(n_images: int, clocks: list, procs: int = 1) -> dict:
    wall = max(n_images / c.wall for c in clocks)
    cpu = max(n_images / c.cpu for c in clocks)
    return {"images_per_s": wall, "images_per_cpu_s": cpu, "per_process_wall": wall / procs,
            "wall_rounds": [n_images / c.wall for c in clocks], "cpu_rounds": [n_images / c.cpu for c in clocks]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crop-images", type=int, default=100, help="images per multi-crop round")
    ap.add_argument("--parts", default="conversion,multicrop,loader", help="comma-separated subset to run")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from sere_scale.data.fastcrop import FastMultiCrop
    from sere_scale.data.masking import MaskGenerator
    from sere_scale.data.multicrop import MultiCrop
    from sere_scale.data.shards import ShardLoader
    from sere_scale.data.transform import SSLTransform

    parts = set(args.parts.split(","))
    work = Path(tempfile.mkdtemp(prefix="data_plane_"))
    try:
        items = make_tree(work / "src", args.n)
        sizes = [p.stat().st_size for p, _ in items]
        res = {"n_images": args.n, "mean_kb": float(np.mean(sizes) / 1e3), "cpus": os.cpu_count(),
               "conversion": {}, "multicrop": {}}
        conv = {"plain ShardWriter (full decode), 1 proc": [], "sere-prep scan, 1 proc": [],
                "sere-prep scan, 2 procs": [], "sere-prep draft, 1 proc": [], "sere-prep full, 1 proc": []}
        for r in range(args.rounds if "conversion" in parts else 0):
            for name, clocks in conv.items():
                out = work / f"out-{r}-{name.split(',')[0].replace(' ', '_')}"
                if name.startswith("plain"):
                    clocks.append(plain_shardwriter(items, out))
                else:
                    check = name.split()[1].rstrip(",")
                    procs = int(name.split(", ")[1].split()[0])
                    clocks.append(ours(work / "src", out, procs, check))
                shutil.rmtree(out)
        for name, v in conv.items():
            if v:
                res["conversion"][name] = summary(args.n, v, 2 if "2 procs" in name else 1)
        datas = [imagenet_like(10_000 + i) for i in range(args.crop_images)]
        fast, slow, dino = FastMultiCrop(), MultiCrop(), dino_pipeline()
        crop = {"torchvision+PIL (DINO/iBOT)": dino,
                "MultiCrop": lambda d: slow(Image.open(io.BytesIO(d))),
                "FastMultiCrop": lambda d: fast(Image.open(io.BytesIO(d)))}
        rates = {k: [] for k in crop}
        for fn in crop.values():  # warm-up
            timed(fn, datas[:3])
        for _ in range(args.rounds if "multicrop" in parts else 0):
            for k, fn in crop.items():
                rates[k].append(timed(fn, datas))
        for k, v in rates.items():
            if v:
                res["multicrop"][k] = summary(len(datas), v)
        # whole loader, one core: tar reading, lazy decode, FastMultiCrop, iBOT masks, collate
        shard_out = work / "shards"
        ours(work / "src", shard_out, 1, "scan")
        tf = SSLTransform(FastMultiCrop(), 16, MaskGenerator())
        lv, nimg = [], 0
        for r in range(args.rounds if "loader" in parts else 0):
            ld = ShardLoader(str(shard_out), tf, 32, 0, 1, seed=r, num_workers=0)
            with Clock() as clk:
                nimg = sum(len(b["index"]) for b in ld.epoch_iter(0))
            lv.append(clk)
        if lv:
            res["loader_fast_1core"] = summary(nimg, lv)
        conv, mc = res["conversion"], res["multicrop"]
        loader = res.get("loader_fast_1core")
        res["ratios"] = {}
        for unit in ("images_per_cpu_s", "images_per_s"):
            pp = 2 if unit == "images_per_s" else 1  # wall-clock rate of 2 processes, per process
            r = res["ratios"][unit] = {}
            if conv:
                plain = conv["plain ShardWriter (full decode), 1 proc"][unit]
                r["conversion scan 1 proc / plain"] = conv["sere-prep scan, 1 proc"][unit] / plain
                r["conversion scan 2 procs (per proc) / plain"] = conv["sere-prep scan, 2 procs"][unit] / pp / plain
                r["conversion scan 2 procs / 1 proc"] = (conv["sere-prep scan, 2 procs"][unit] /
                                                         conv["sere-prep scan, 1 proc"][unit])
                r["conversion draft 1 proc / plain"] = conv["sere-prep draft, 1 proc"][unit] / plain
            if mc:
                base = mc["torchvision+PIL (DINO/iBOT)"][unit]
                r["FastMultiCrop / torchvision"] = mc["FastMultiCrop"][unit] / base
                r["MultiCrop / torchvision"] = mc["MultiCrop"][unit] / base
                if loader:
                    r["ShardLoader+FastMultiCrop / torchvision crop only"] = loader[unit] / base
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
