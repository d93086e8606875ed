"""Data-plane benchmark (issue 8): conversion and multi-crop loading throughput on ImageNet-like JPEGs.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/data_plane.py [--n 300] [--rounds 3] [--json out.json]

Conversion: ``sere-prep`` (1 and 2 processes; ``--check`` scan, draft, full) against a plain single-process
``webdataset.ShardWriter`` loop that decodes every image fully (PIL) and writes jpg + cls. Loading (one core):
decode + 2×224 + 10×96 multi-crop with jitter, grayscale, blur, solarize: the DINO/iBOT torchvision + PIL
pipeline vs ``MultiCrop`` vs ``FastMultiCrop``, plus the whole ``ShardLoader`` (tar reading, masks, collate).
Rounds are interleaved and the best round of each is reported (the machine may be shared).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
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


# ---- conversion --------------------------------------------------------------------------------------------------
def plain_shardwriter(items, out: Path) -> float:
    import webdataset as wds
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for i, (p, c) in enumerate(items):
            data = p.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.convert("RGB")  # full decode, as a plain checking converter does
            sink.write({"__key__": f"{i:08d}", "jpg": data, "cls": c})
    return len(items) / (time.perf_counter() - t)


def ours(src: Path, out: Path, workers: int, check: str, n: int) -> float:
    from data_prep.convert import ConvertOptions, convert
    t = time.perf_counter()
    convert(ConvertOptions(str(src), str(out), shard_size=100, workers=workers, check=check, progress=False))
    return n / (time.perf_counter() - t)


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


def per_image_rate(fn, datas) -> float:
    random.seed(0)
    torch.manual_seed(0)
    t = time.perf_counter()
    for d in datas:
        fn(d)
    return len(datas) / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--crop-images", type=int, default=100, help="images per multi-crop round")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from sere_scale.data.fastcrop import FastMultiCrop
    from sere_scale.data.multicrop import MultiCrop
    from sere_scale.data.shards import ShardLoader
    from sere_scale.data.masking import MaskGenerator
    from sere_scale.data.transform import SSLTransform

    work = Path(tempfile.mkdtemp(prefix="data_plane_"))
    try:
        items = make_tree(work / "src", args.n)
        sizes = [p.stat().st_size for p, _ in items]
        res = {"n_images": args.n, "mean_kb": float(np.mean(sizes) / 1e3), "cpus": os.cpu_count(),
               "conversion": {}, "multicrop": {}}
        conv = {"plain ShardWriter (full decode), 1 proc": [], "sere-prep scan, 1 proc": [],
                "sere-prep scan, 2 procs": [], "sere-prep draft, 1 proc": [], "sere-prep full, 1 proc": []}
        for r in range(args.rounds):
            for name in conv:
                out = work / f"out-{r}-{len(conv[name])}-{name.split(',')[0].replace(' ', '_')}"
                if name.startswith("plain"):
                    conv[name].append(plain_shardwriter(items, out))
                else:
                    check = name.split()[1].rstrip(",")
                    procs = int(name.split(", ")[1].split()[0])
                    conv[name].append(ours(work / "src", out, procs, check, args.n))
                shutil.rmtree(out)
        for name, v in conv.items():
            procs = 2 if "2 procs" in name else 1
            res["conversion"][name] = {"images_per_s": max(v), "per_process": max(v) / procs, "rounds": v}
        datas = [imagenet_like(10_000 + i) for i in range(args.crop_images)]
        fast, slow, dino = FastMultiCrop(), MultiCrop(), dino_pipeline()
        crop = {"torchvision+PIL (DINO/iBOT)": dino,
                "MultiCrop": lambda d: slow(Image.open(io.BytesIO(d))),
                "FastMultiCrop": lambda d: fast(Image.open(io.BytesIO(d)))}
        rates = {k: [] for k in crop}
        for _ in range(args.rounds):
            for k, fn in crop.items():
                rates[k].append(per_image_rate(fn, datas))
        for k, v in rates.items():
            res["multicrop"][k] = {"images_per_s": max(v), "rounds": v}
        # whole loader, one core: tar reading, lazy decode, FastMultiCrop, iBOT masks, collate
        shard_out = work / "shards"
        ours(work / "src", shard_out, 1, "scan", args.n)
        tf = SSLTransform(FastMultiCrop(), 16, MaskGenerator())
        lv = []
        for r in range(args.rounds):
            ld = ShardLoader(str(shard_out), tf, 32, 0, 1, seed=r, num_workers=0)
            t = time.perf_counter()
            nb = sum(1 for _ in ld.epoch_iter(0))
            lv.append(nb * 32 / (time.perf_counter() - t))
        res["loader_fast_1core"] = {"images_per_s": max(lv), "rounds": lv}
        base = res["multicrop"]["torchvision+PIL (DINO/iBOT)"]["images_per_s"]
        plain = res["conversion"]["plain ShardWriter (full decode), 1 proc"]["images_per_s"]
        res["ratios"] = {
            "conversion_scan_per_proc_vs_plain": res["conversion"]["sere-prep scan, 1 proc"]["per_process"] / plain,
            "conversion_scan_2proc_per_proc_vs_plain":
                res["conversion"]["sere-prep scan, 2 procs"]["per_process"] / plain,
            "conversion_draft_vs_plain": res["conversion"]["sere-prep draft, 1 proc"]["per_process"] / plain,
            "fast_multicrop_vs_torchvision": res["multicrop"]["FastMultiCrop"]["images_per_s"] / base,
            "multicrop_vs_torchvision": res["multicrop"]["MultiCrop"]["images_per_s"] / base,
            "loader_fast_vs_torchvision_crop_only": res["loader_fast_1core"]["images_per_s"] / base,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
