"""Per-rank bytes of parameters, gradients and optimizer state under the sharded engines (FSDP2, ZeRO-3) at
several world sizes, against the ideal 1/N of the one-rank total. Counts what each rank actually holds (local
shard / partition storage, each storage once), not an estimate. Runs on CPU with gloo (``torchrun`` per world
size; 4 ranks on 2 cores is fine for a byte count).

    python benchmarks/engine_memory.py --config configs/ibot_sere_vit_s16.yaml --worlds 1 2 4 \\
        --backends fsdp zero3 [--precision fp32] [--json out.json]

Each rank builds the engine, runs one forward/backward on a tiny synthetic multi-crop batch (every head in
use, so every parameter gets a gradient), counts gradients, takes one optimizer step (creates AdamW state),
then counts parameters (student + EMA teacher, every copy the engine keeps: FSDP2 fp32 shards; ZeRO-3 compute
partitions + fp32 master partitions) and optimizer state. "ratio" = ideal / max-rank bytes (1.0 = perfect).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = {"fsdp": ["engine.backend=fsdp"], "zero3": ["engine.backend=deepspeed", "engine.zero_stage=3"],
            "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"],
            "zero1": ["engine.backend=deepspeed", "engine.zero_stage=1"], "ddp": ["engine.backend=ddp"]}


# ------------------------------------------------------------------------------------------ worker (per rank)
class _Bytes:
    """Bytes of tensor storage, each byte once: overlapping views of one storage (a ZeRO flat buffer and its
    per-parameter views, or the same buffer reached twice) are merged as byte intervals."""

    def __init__(self):
        self.spans: dict = {}

    def add(self, tensors) -> int:
        before = self.total()
        for t in tensors:
            if t is None:
                continue
            if hasattr(t, "to_local"):
                t = t.to_local()
            if t.numel() == 0:
                continue
            start = t.storage_offset() * t.element_size()
            span = (start, start + t.numel() * t.element_size())
            self.spans.setdefault(t.untyped_storage().data_ptr(), []).append(span)
        return self.total() - before

    def total(self) -> int:
        n = 0
        for spans in self.spans.values():
            end = -1
            for a, b in sorted(spans):
                if b > end:
                    n += b - max(a, end)
                    end = b
        return n


def _count(eng, phase: str) -> dict:
    import torch
    seen = _Bytes()
    if phase == "grads":
        if eng.name == "deepspeed" and eng.stage == 3:
            from deepspeed.utils import safe_get_local_grad
            return {"grads": seen.add([safe_get_local_grad(p) for p in eng.student_module.parameters()])}
        if eng.name == "deepspeed":  # ZeRO-1/2: the fp32 gradient partitions being reduced into
            return {"grads": seen.add([g for gs in eng.ds.optimizer.averaged_gradients.values() for g in gs])}
        return {"grads": seen.add([p.grad for p in eng.student_module.parameters()])}
    out = {}
    if eng.name == "deepspeed":
        zero = eng.ds.optimizer
        if eng.stage == 3:
            student = [p.ds_tensor for p in eng.student_module.parameters()] + list(zero.fp32_partitioned_groups_flat)
            teacher = [p.ds_tensor for p in eng.teacher_module.parameters()] + list(eng._t32)
        else:
            student = list(eng.student_module.parameters()) + list(zero.single_partition_of_fp32_groups)
            teacher = list(eng.teacher_module.parameters())
        states = zero.optimizer.state.values()
    else:
        student = list(eng.student_module.parameters())
        teacher = list(eng.teacher_module.parameters())
        states = eng.optimizer.state.values()
    out["student_params"] = seen.add(student)
    out["teacher_params"] = seen.add(teacher)
    out["optimizer"] = seen.add([v for st in states for v in st.values() if torch.is_tensor(v)])
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from sere_scale.config.load import load_config
    from sere_scale.engine.distributed import init_distributed
    from sere_scale.run.startup import build_parts

    info = init_distributed()
    cfg = load_config(args.config, [*BACKENDS[args.backend], f"train.precision={args.precision}",
                                    "data.batch_size=1", "model.drop_path=0", *args.overrides])
    _, eng = build_parts(cfg, info)
    # a tiny synthetic multi-crop batch: 2 globals and 2 locals of 32 px, one image each, per rank
    g = torch.randn(2, 3, 32, 32, device=eng.device)
    loc = torch.randn(2, 3, 32, 32, device=eng.device) if cfg.data.n_local > 0 else None
    masks = torch.zeros(2, 2, 2, dtype=torch.bool, device=eng.device) if cfg.image_loss.kind == "ibot" else None
    with eng.no_sync(False):
        with eng.autocast():
            out = eng.student(g, loc, masks, predict=True)
        loss = sum(v.float().mean() for branch in out.values() if branch for v in branch.values()
                   if torch.is_tensor(v) and v.is_floating_point())
        eng.backward(loss)
    counts = _count(eng, "grads")
    eng.step(1e-6, 0.04, False)
    counts.update(_count(eng, "state"))
    counts["total"] = sum(counts.values())
    every = [None] * dist.get_world_size() if dist.is_initialized() else [counts]
    if dist.is_initialized():
        dist.all_gather_object(every, counts)
    if info.is_main:
        Path(args.worker_out).write_text(json.dumps(every))
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ driver
def run(args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for n in args.worlds:
                out = Path(tmp) / f"{backend}_{n}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       str(Path(__file__).resolve()), "--worker-out", str(out), "--config", args.config,
                       "--backends", backend, "--precision", args.precision, *args.overrides]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    sys.exit(f"{backend} at {n} ranks failed:\n{res.stderr[-4000:]}")
                results[f"{backend}/{n}"] = json.loads(out.read_text())
    return results


def table(results: dict) -> str:
    rows = ["| backend | ranks | student params | teacher params | grads | optimizer | total (max rank) | "
            "ideal = 1-rank total / N | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    mib = 2 ** 20
    for key, ranks in results.items():
        backend, n = key.split("/")
        base = results.get(f"{backend}/1")
        worst = max(ranks, key=lambda r: r["total"])
        ideal = base[0]["total"] / int(n) if base else float("nan")
        rows.append(f"| {backend} | {n} | {worst['student_params'] / mib:.2f} | {worst['teacher_params'] / mib:.2f} "
                    f"| {worst['grads'] / mib:.2f} | {worst['optimizer'] / mib:.2f} | {worst['total'] / mib:.2f} "
                    f"| {ideal / mib:.2f} | {ideal / worst['total']:.3f} |")
    return "\n".join(rows) + "\n\n(MiB per rank; the rank holding the most bytes)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ibot_sere_vit_s16.yaml"))
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--backends", nargs="+", default=["fsdp", "zero3"], choices=sorted(BACKENDS))
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--json", help="also write the raw per-rank counts here")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = ap.parse_args(argv)
    if args.worker_out:
        args.backend = args.backends[0]
        worker(args)
        return 0
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
