"""Dense evaluation costs: patch-feature extraction (images/s), segmentation-probe times, and the peak extra memory
of the nearest-neighbour retrieval against the memory-bank size (eval/dense/).

    python benchmarks/dense_eval.py                                   # CPU: tiny model, small sizes
    python benchmarks/dense_eval.py --device cuda --arch vit_small --size 512 --banks 1000,10000,100000,400000

Prints markdown tables.

* Extraction: ``patch_features`` on random images of ``size × 4/3·size`` (a short side of ``size``), batch
  ``--batch``, after one warm-up batch; the median of ``--repeats`` timed batches.
* Probes: ``run_segprobe`` on a synthetic generic-layout folder (random coloured stripes and their masks, made in
  a temporary folder): build/fit time and evaluation time per validation image.
* Retrieval memory: ``PatchBank.soft_labels`` (exact top-k, chunks of queries × bank rows) for one image's worth
  of queries (``--queries``) against banks of ``--banks`` random patches, and for contrast the one-shot
  ``queries @ bank.T`` + ``topk``. Peak extra memory = peak during the call minus the memory held before it (the
  bank itself is not counted). CPU: each measurement runs in a fresh interpreter with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (large tensors are returned to the OS on free); after a warm-up call the
  kernel's high-water mark is reset (``/proc/self/clear_refs`` ← 5) and the peak is ``VmHWM`` − ``VmRSS`` before
  the call. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sere_scale.eval.dense.features import patch_features  # noqa: E402
from sere_scale.eval.dense.nn_probe import PatchBank  # noqa: E402
from sere_scale.eval.dense.segprobe import run_segprobe  # noqa: E402


def build_model(arch: str):
    import timm

    from sere_scale.config.arch import VARIANTS
    name, kw = VARIANTS.get(arch, (arch, {}))
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True, **kw).eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def extraction(model, size, batch, layers, repeats, device):
    x = torch.randn(batch, 3, size, size * 4 // 3, device=device)
    patch_features(model, x, layers)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        patch_features(model, x, layers)
        sync(device)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def toy_data(root: Path, n_train: int, n_val: int, size: int, classes: int = 5):
    from PIL import Image
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(classes, 3))
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(n):
            w = size * 4 // 3 // 16 * 16
            lab = np.repeat(rng.integers(0, classes, size=w // 16), 16)[None].repeat(size, 0).astype(np.uint8)
            img = np.clip(colours[lab] + rng.integers(-15, 16, size=(size, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "images" / split / f"{i}.png")
            Image.fromarray(lab).save(root / "masks" / split / f"{i}.png")


def probes(model, args):
    rows = []
    with tempfile.TemporaryDirectory() as d:
        toy_data(Path(d), args.n_train, args.n_val, args.size)
        common = dict(size=args.size, num_classes=5, ignore_index=255, device=args.device, layers=1)
        for method, kw in (("nn", dict(memory_size=args.memory)),
                           ("linear-cached", dict(iters=args.iters, batch_size=4)),
                           ("linear", dict(iters=args.iters, batch_size=4, crop=args.size))):
            r = run_segprobe(model, d, method=method, **common, **kw)
            s = r["seconds"]
            detail = (f"bank {r['protocol']['bank_patches']} patches" if method == "nn"
                      else f"{args.iters} iters, batch 4")
            rows.append((method, detail, s["fit"], s["evaluate"] / args.n_val))
    return rows


def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


@torch.no_grad()
def retrieval(n_bank, n_query, dim, classes, kind, device):
    """(peak extra bytes, seconds) of one retrieval call; run in its own process on the CPU."""
    g = torch.Generator(device=device).manual_seed(0)
    bank = PatchBank(F.normalize(torch.randn(n_bank, dim, device=device, generator=g), dim=1),
                     torch.rand(n_bank, classes, device=device, generator=g))
    q = F.normalize(torch.randn(n_query, dim, device=device, generator=g), dim=1)

    def call(qq):
        if kind == "chunked":
            return bank.soft_labels(qq)
        sim = qq @ bank.features.T
        v, i = sim.topk(30, dim=1)
        return torch.einsum("qk,qkc->qc", torch.softmax(v / 0.02, 1), bank.hists[i])
    call(q[:8])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss("VmRSS")
    t = time.perf_counter()
    out = call(q)
    sync(device)
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else _rss("VmHWM")
    del out
    return peak - base, dt


def retrieval_row(n_bank, args, kind):
    if torch.device(args.device).type == "cuda":
        return retrieval(n_bank, args.queries, args.dim, args.classes, kind, args.device)
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(ROOT / 'benchmarks')!r});"
            f"from dense_eval import retrieval; print(json.dumps(retrieval({n_bank}, {args.queries}, {args.dim}, "
            f"{args.classes}, {kind!r}, 'cpu')))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="vit_tiny_cpu", help="timm name or project variant (random weights)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-train", type=int, default=16)
    p.add_argument("--n-val", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--memory", type=int, default=10240)
    p.add_argument("--banks", default="1000,10000,100000,200000")
    p.add_argument("--queries", type=int, default=1344, help="queries per call (a 512x683 image at patch 16)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--skip", default="", help="comma list of sections to skip: extract,probes,memory")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    dev = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}\n")
    model = build_model(args.arch).to(args.device)
    if "extract" not in skip:
        print("| arch | input | layers | batch | images/s |\n|---|---|---|---|---|")
        for layers in (1, 4):
            ips = extraction(model, args.size, args.batch, layers, args.repeats, args.device)
            print(f"| {args.arch} | {args.size}x{args.size * 4 // 3} | {layers} | {args.batch} | {ips:.2f} |")
        print()
    if "probes" not in skip:
        print(f"| probe | settings | fit s ({args.n_train} train images) | evaluate s / image |\n|---|---|---|---|")
        for method, detail, fit, per in probes(model, args):
            print(f"| {method} | {detail}, size {args.size} | {fit:.2f} | {per:.3f} |")
        print()
    if "memory" not in skip:
        print("| bank patches | bank MiB | chunked: peak extra MiB | chunked s | one-shot: peak extra MiB | "
              "one-shot s |\n|---|---|---|---|---|---|")
        for n in (int(b) for b in args.banks.split(",")):
            (mc, tc), (mo, to) = retrieval_row(n, args, "chunked"), retrieval_row(n, args, "one-shot")
            bank_mib = n * (args.dim + args.classes) * 4 / 2**20
            print(f"| {n} | {bank_mib:.0f} | {mc / 2**20:.1f} | {tc:.3f} | {mo / 2**20:.1f} | {to:.3f} |")


if __name__ == "__main__":
    main()
