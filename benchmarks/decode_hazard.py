"""Does nvJPEG (through torchvision) write into memory that queued kernels still read? (pytorch/vision#9606)

Each iteration fills tensors of the decoded images' size, queues a long kernel and one reduction per tensor,
frees the tensors while the reductions are still queued, then decodes a batch of JPEGs (which the caching
allocator may place in the freed blocks) and checks every reduction against its exact value. Run for the raw
``torchvision.io.decode_jpeg(list, device="cuda")`` and for ``sere_scale.data.decode.decode_images`` (which drains
the caller's stream first), on baseline JPEGs (nvJPEG's hardware engine where the GPU has one) and progressive
ones (software path).

    python benchmarks/decode_hazard.py --iters 50 --out decode_hazard.json

Prints one JSON object: corrupted iterations per (decoder, JPEG kind) and the mean time of one decode call.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sere_scale.data.decode import as_uint8_tensor, decode_images  # noqa: E402


def jpeg(size: int, progressive: bool, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(b, "JPEG", quality=90,
                                                                                 progressive=progressive)
    return b.getvalue()


def raw_decode(data: list) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_jpeg([as_uint8_tensor(d) for d in data], mode=ImageReadMode.RGB, device="cuda")


def run(decode, data: list, n_bytes: int, iters: int, n_held: int, sleep_cycles: int) -> dict:
    bad_iters, bad_sums, times = 0, 0, []
    for it in range(iters):
        held = [torch.full((n_bytes,), (it + k) % 251, dtype=torch.uint8, device="cuda") for k in range(n_held)]
        torch.cuda.synchronize()
        torch.cuda._sleep(sleep_cycles)
        sums = [t.sum(dtype=torch.int64) for t in held]
        del held
        t0 = time.perf_counter()
        decode(data)
        times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wrong = sum(int(s) != ((it + k) % 251) * n_bytes for k, s in enumerate(sums))
        bad_sums += wrong
        bad_iters += wrong > 0
    return {"corrupted_iterations": bad_iters, "wrong_sums": bad_sums, "iterations": iters,
            "decode_call_ms_mean": 1e3 * sum(times) / len(times)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="JPEGs per decode call (and tensors freed before it)")
    ap.add_argument("--size", type=int, default=128, help="square image side")
    ap.add_argument("--sleep-cycles", type=int, default=50_000_000, help="queued device work before the reductions")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        res = {"skipped": "needs CUDA"}
        print(json.dumps(res))
        if args.out:
            Path(args.out).write_text(json.dumps(res))
        return res
    n_bytes = 3 * args.size * args.size
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "results": {}}
    import torchvision
    res["torchvision"] = torchvision.__version__
    for kind, progressive in (("baseline", False), ("progressive", True)):
        data = [jpeg(args.size, progressive, s) for s in range(args.batch)]
        for name, fn in (("torchvision_decode_jpeg", raw_decode),
                         ("sere_scale_decode_images", lambda d: decode_images(d, "cuda"))):
            fn(data)  # warm-up: decoder handles, allocator blocks
            torch.cuda.synchronize()
            res["results"][f"{name}/{kind}"] = run(fn, data, n_bytes, args.iters, args.batch, args.sleep_cycles)
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
