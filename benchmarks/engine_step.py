"""Training-step time and peak memory per engine (DDP, FSDP2, ZeRO-1/2/3) on synthetic multi-crop batches:
the real method (losses), engine (backward, clipped step, EMA) and precision, no data loading.

    # one node, 8 GPUs, bf16, ViT-L preset (as is; any key=value overrides after the options)
    python benchmarks/engine_step.py --device cuda --nproc 8 --config configs/ibot_sere_vit_l16_fsdp.yaml \\
        --backends ddp fsdp zero2 zero3 --steps 20 --warmup 5
    # CPU smoke run of the script itself (tiny model, 2 ranks, fp32)
    python benchmarks/engine_step.py --device cpu --nproc 2 --tiny --steps 3 --warmup 1

Per backend one ``torchrun`` launch; each rank times ``--steps`` optimizer steps (``step.train_step``, the step
that trains) after ``--warmup`` (median
and mean ms/step, global images/s) and reports its peak memory (CUDA: ``max_memory_allocated``; CPU: max RSS).
Prints a markdown table with the device name and the command.
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

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"ddp": ["engine.backend=ddp"], "fsdp": ["engine.backend=fsdp"],
            "fsdp_hybrid": ["engine.backend=fsdp", "engine.fsdp_strategy=hybrid"],
            "fsdp_grad_op": ["engine.backend=fsdp", "engine.fsdp_strategy=grad_op"],
            "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"],
            "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
            "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"]}
TINY = ["model.arch=vit_tiny_cpu", "model.depth=2", "data.global_size=32", "data.local_size=16", "data.n_local=2",
        "data.batch_size=8", "image_loss.out_dim=64", "image_loss.hidden_dim=32", "image_loss.bottleneck_dim=16",
        "sere.spatial_size_global=3", "sere.spatial_size_local=2", "train.precision=fp32"]


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from sere_scale.config.load import load_config
    from sere_scale.data.synthetic import SyntheticLoader
    from sere_scale.engine.distributed import init_distributed
    from sere_scale.models.backbone import patch_size_of
    from sere_scale.method.schedules import build_schedules
    from sere_scale.run.startup import build_parts
    from sere_scale.run.step import Batches, train_step

    info = init_distributed(device=args.device)
    extra = TINY if args.tiny else []
    cfg = load_config(args.config, [*extra, *BACKENDS[args.backend], *args.overrides])
    method, eng = build_parts(cfg, info)  # the trainer's set-up
    sched = build_schedules(cfg, 1000, info.world_size)
    # batches built on the device once: the timed steps hold no data loading and no host-to-device copy
    loader = SyntheticLoader(cfg, patch_size_of(cfg.model), device=eng.device)
    batches = Batches(loader, {"epoch": 0, "batch": 0}, eng.device)
    cuda = eng.device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        # the trainer's step, past warm-up and the frozen last layer
        train_step(eng, method, batches, sched.at(5000 + i), cfg.train.grad_accum, info.world_size,
                   freeze_last_layer=False)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        name = torch.cuda.get_device_name()
    else:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        import platform
        name = platform.processor() or "cpu"
    rec = {"ms_median": 1e3 * statistics.median(times), "ms_mean": 1e3 * statistics.mean(times), "peak": peak,
           "device": name, "precision": eng.precision}
    every = [None] * info.world_size
    if dist.is_initialized():
        dist.all_gather_object(every, rec)
    else:
        every = [rec]
    if info.is_main:
        gb = cfg.data.batch_size * cfg.train.grad_accum * info.world_size
        Path(args.worker_out).write_text(json.dumps({"ranks": every, "global_batch": gb}))
    if dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ibot_sere_vit_l16_fsdp.yaml"))
    ap.add_argument("--tiny", action="store_true", help="tiny CPU model (smoke run of this script)")
    ap.add_argument("--backends", nargs="+", default=["ddp", "fsdp", "zero2", "zero3"], choices=sorted(BACKENDS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the rows (and failures) to this JSON file")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = ap.parse_args(argv)
    if args.worker_out:
        worker(args)
        return 0
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1" if args.device == "cpu" else "8")
    if args.device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    rows, records, device = [], [], "?"
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.backends:
            out = Path(tmp) / f"{b}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   str(Path(__file__).resolve()), "--worker-out", str(out), "--backend", b, "--device", args.device,
                   "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   *(["--tiny"] if args.tiny else []), *args.overrides]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                lines = res.stderr.strip().splitlines() or ["(no output)"]
                print(f"# {b} failed (exit {res.returncode}); the end of its output:", file=sys.stderr)
                print("\n".join(lines[-40:]), file=sys.stderr, flush=True)
                err = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1]).strip()
                rows.append(f"| {b} | failed: {err[:200]} | | | |")
                records.append({"backend": b, "error": err[:500], "returncode": res.returncode})
                continue
            r = json.loads(out.read_text())
            ms = max(x["ms_median"] for x in r["ranks"])
            peak = max(x["peak"] for x in r["ranks"]) / 2**30
            rows.append(f"| {b} | {r['ranks'][0]['precision']} | {ms:.1f} | {r['global_batch'] / ms * 1e3:.1f} | "
                        f"{peak:.2f} |")
            device = r["ranks"][0]["device"]
            records.append({"backend": b, "precision": r["ranks"][0]["precision"], "ms_median": ms,
                            "img_per_s": r["global_batch"] / ms * 1e3, "peak_gib": peak,
                            "global_batch": r["global_batch"], "device": device, "ranks": r["ranks"]})
    head = f"{args.nproc} x {device}; `{' '.join(['python', *sys.argv])}`"
    lines = [head, "", "| backend | precision | ms/step (median, slowest rank) | images/s | "
             "peak memory GiB (max rank) |", "|---|---|---|---|---|", *rows]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps({"header": head, "nproc": args.nproc, "overrides": args.overrides,
                                              "steps": args.steps, "warmup": args.warmup, "rows": records,
                                              "table": "\n".join(lines[2:])}, indent=1))
    return 0 if all("error" not in r for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
