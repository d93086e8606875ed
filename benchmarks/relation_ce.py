"""Time and peak extra memory of the relation cross-entropy implementations (forward + backward).

    python benchmarks/relation_ce.py --device cuda                      # paper-scale sizes, plain/chunked/triton
    python benchmarks/relation_ce.py --device cpu --sizes cpu-mem,paper  # CPU, reduced sizes

Prints a markdown table; time and memory ratios are against ``plain`` measured in the same run.

Peak extra memory = peak during one forward+backward minus what was allocated before it (inputs exist, the
student gradient is part of the "extra").
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor bytes, caching excluded).
* CPU: every (size, impl) runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` so large tensors are
  mmap'd and unmapped on free (RSS follows live memory); after a tiny warm-up call (lazy library init), the
  baseline is the current RSS (/proc/self/statm) and the peak is ``ru_maxrss`` after one full-size call.
  This counts every byte the process touches (allocator overhead included), within a few MiB.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sere_scale.kernels import chunked, relation_cross_entropy  # noqa: E402
from sere_scale.engine.precision import LOWP_DTYPES  # noqa: E402

# name: (G, R, Ds, Dt, description)
PRESETS = {
    "paper": (384, 169, 128, 128, "spatial B64 M6 S²=169 C768"),
    "m12": (768, 784, 64, 64, "spatial B64 M12 N784 C768"),
    "m16": (1024, 1369, 64, 64, "spatial B64 M16 N1369 C1024"),
    "channel": (64, 1024, 196, 196, "channel B64 N196 C1024"),
    "cpu-mem": (64, 1369, 64, 64, "spatial B4 M16 N1369 (CPU memory check)"),
}
DTYPES = {"fp32": torch.float32, **LOWP_DTYPES}
MIB = 2 ** 20


def parse_size(spec: str):
    if spec in PRESETS:
        return (spec, *PRESETS[spec])
    dims = [int(v) for v in spec.lower().split("x")]
    if len(dims) not in (3, 4):
        raise argparse.ArgumentTypeError(f"size '{spec}': a preset {list(PRESETS)} or GxRxD[xDt]")
    G, R, Ds = dims[:3]
    return (spec, G, R, Ds, dims[3] if len(dims) == 4 else Ds, "custom")


def make_inputs(G, R, Ds, Dt, device, dtype, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(G, R, Ds, device=device, dtype=dtype, generator=gen).requires_grad_(True)
    t = torch.randn(G, R, Dt, device=device, dtype=dtype, generator=gen)
    return s, t


def step(impl, s, t):
    s.grad = None
    D = s.shape[2]
    loss = relation_cross_entropy(s, t, 1.0 / math.sqrt(D), 2.0 / math.sqrt(D), impl=impl)
    loss.backward()
    return loss


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(impl, G, R, Ds, Dt, device, dtype, repeats, warmup):
    """One (size, impl): {'loss', 'peak_mib', 'fwd_ms', 'step_ms'} or {'error'}."""
    try:
        tiny = make_inputs(2, 8, Ds, Dt, device, dtype)
        step(impl, *tiny)  # lazy init (kernels, thread pools) outside the memory window
        s, t = make_inputs(G, R, Ds, Dt, device, dtype)
        _sync(device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = step(impl, s, t)
            _sync(device)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            base = _rss()
            loss = step(impl, s, t)
            peak = _max_rss() - base
        for _ in range(warmup):
            step(impl, s, t)
        fwd, full = [], []
        for _ in range(repeats):
            s.grad = None
            _sync(device)
            t0 = time.perf_counter()
            out = relation_cross_entropy(s, t, 1.0 / math.sqrt(Ds), 2.0 / math.sqrt(Ds), impl=impl)
            _sync(device)
            t1 = time.perf_counter()
            out.backward()
            _sync(device)
            t2 = time.perf_counter()
            fwd.append((t1 - t0) * 1e3)
            full.append((t2 - t0) * 1e3)
        return {"loss": loss.item(), "peak_mib": peak / MIB, "fwd_ms": statistics.median(fwd),
                "step_ms": statistics.median(full)}
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # noqa: BLE001 -- keep the table going (CPU allocation failure, compile error, ...)
        first = (str(e).splitlines() or [""])[0]
        return {"error": f"{type(e).__name__}: {first}"[:80]}


def measure_isolated(args, impl, size):
    """Run ``measure`` in a fresh interpreter so ru_maxrss belongs to this measurement alone."""
    cmd = [sys.executable, __file__, "--child", json.dumps({"impl": impl, "size": list(size[1:5])}),
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.block_elems:
        cmd += ["--block-elems", str(args.block_elems)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["crashed"])[-1][:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v, spec):
    return "–" if v is None else format(v, spec)


def table(rows):
    head = ("| size | G×R×Ds(×Dt) | impl | fwd ms | fwd+bwd ms | peak extra MiB | time vs plain | "
            "memory plain/impl | Δloss vs plain |\n|---|---|---|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for (name, G, R, Ds, Dt, _), impl, res, base in rows:
        dims = f"{G}×{R}×{Ds}" + (f"×{Dt}" if Dt != Ds else "")
        if "error" in res:
            lines.append(f"| {name} | {dims} | {impl} | {res['error']} | | | | | |")
            continue
        ok = base is not None and "error" not in base
        t_ratio = res["step_ms"] / base["step_ms"] if ok else None
        # RSS deltas are only good to ~1 MiB: no ratio below that
        m_ok = ok and min(res["peak_mib"], base["peak_mib"]) >= 1.0
        m_ratio = base["peak_mib"] / res["peak_mib"] if m_ok else None
        dloss = abs(res["loss"] - base["loss"]) if ok else None
        lines.append(f"| {name} | {dims} | {impl} | {res['fwd_ms']:.1f} | {res['step_ms']:.1f} | "
                     f"{res['peak_mib']:.1f} | {fmt(t_ratio, '.2f')}× | {fmt(m_ratio, '.1f')}× | "
                     f"{fmt(dloss, '.1e')} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--sizes", default=None,
                   help=f"comma list of presets {list(PRESETS)} or GxRxD[xDt]; "
                        "default: paper,m12,m16,channel on cuda, cpu-mem,paper,channel on cpu")
    p.add_argument("--impls", default=None, help="comma list; default plain,chunked(,triton on cuda)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--block-elems", type=int, default=None, help="chunked slab budget (elements)")
    p.add_argument("--no-isolate", action="store_true", help="CPU: measure in-process (memory then unreliable)")
    p.add_argument("--json", default=None, help="also write the rows and the table to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.block_elems:
        chunked.DEFAULT_BLOCK_ELEMS = chunked.DEFAULT_BLOCK_ELEMS_CUDA = args.block_elems
    dtype = DTYPES[args.dtype]
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure(job["impl"], *job["size"], args.device, dtype, args.repeats, args.warmup)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    default_sizes = "paper,m12,m16,channel" if args.device == "cuda" else "cpu-mem,paper,channel"
    sizes = [parse_size(v) for v in (args.sizes or default_sizes).split(",")]
    impls = (args.impls or ("plain,chunked,triton" if args.device == "cuda" else "plain,chunked")).split(",")
    if "plain" in impls:
        impls = ["plain"] + [i for i in impls if i != "plain"]
    isolate = args.device == "cpu" and not args.no_isolate
    rows = []
    for size in sizes:
        base = None
        for impl in impls:
            if isolate:
                res = measure_isolated(args, impl, size)
            else:
                res = measure(impl, *size[1:5], args.device, dtype, args.repeats, args.warmup)
            if impl == "plain":
                base = res
            rows.append((size, impl, res, base))
            print(f"# {size[0]} {impl}: {res}", file=sys.stderr, flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({args.threads} threads)"
    budget = chunked.DEFAULT_BLOCK_ELEMS_CUDA if args.device == "cuda" else chunked.DEFAULT_BLOCK_ELEMS
    head = (f"device: {dev}, dtype: {args.dtype}, repeats: {args.repeats} (median), "
            f"chunked block budget: {budget} elements")
    print(head + "\n")
    print(table(rows))
    if args.json:
        out = {"header": head, "device": dev, "dtype": args.dtype, "repeats": args.repeats, "torch": torch.__version__,
               "rows": [{"size": size[0], "G": size[1], "R": size[2], "Ds": size[3], "Dt": size[4], "impl": impl,
                         **res} for size, impl, res, _ in rows],
               "table": table(rows)}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
