"""GPU check of ``sere-scale plan``'s memory prediction (issue 25): for each preset and backend, the plan's
predicted peak per rank on one GPU against ``torch.cuda.max_memory_allocated`` over real training steps.

    PYTHONPATH=. python benchmarks/plan_gpu_check.py [--configs a.yaml,b.yaml] [--backends ddp,fsdp:full]
        [--batch 32] [--steps 3] [--json out.json]

Each (config, backend) runs in a fresh subprocess (the plan's trace needs a process without a process group;
the real engine makes one): first the plan at one GPU (its trace on the CPU, bf16 as on the GPU), then
``--steps`` real steps on synthetic batches of the same size, the peak read after a warm-up step. Meant as a
step of the GPU session (benchmarks/gpu_session.py); on a CPU-only machine it refuses.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = "configs/ibot_sere_vit_b16.yaml,configs/ibot_sere_vit_l16_fsdp.yaml"


def one(config: str, backend: str, batch: int, steps: int) -> dict:
    import torch

    from sere_scale.config.load import load_config
    from sere_scale.data.synthetic import SyntheticLoader
    from sere_scale.engine.distributed import DistInfo
    from sere_scale.models.backbone import patch_size_of
    from sere_scale.plan.planner import backend_overrides
    from sere_scale.plan.trace import trace_step
    from sere_scale.method.schedules import build_schedules
    from sere_scale.run.startup import build_parts
    from sere_scale.run.step import Batches, train_step
    ov = [f"data.batch_size={batch}", "train.precision=bf16", "data.num_workers=0", *backend_overrides(backend, 8)]
    cfg = load_config([config], ov)
    tr = trace_step(cfg, 1)
    info = DistInfo(0, 1, 0, torch.device("cuda", 0))
    method, engine = build_parts(cfg, info)
    batches = Batches(SyntheticLoader(cfg, patch_size_of(cfg.model), device="cuda"), {"epoch": 0, "batch": 0},
                      info.device)
    sched = build_schedules(cfg, 1000, 1).at(1000)
    train_step(engine, method, batches, sched, cfg.train.grad_accum, 1, freeze_last_layer=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        train_step(engine, method, batches, sched, cfg.train.grad_accum, 1, freeze_last_layer=False)
    torch.cuda.synchronize()
    real = torch.cuda.max_memory_allocated()
    return {"config": config, "backend": backend, "batch": batch, "predicted_peak_bytes": tr.peak_bytes,
            "max_memory_allocated": real, "ratio": tr.peak_bytes / real, "device": torch.cuda.get_device_name()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--backends", default="ddp,fsdp:full")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "BACKEND"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], a.one[1], a.batch, a.steps)))
        return 0
    import torch
    if not torch.cuda.is_available():
        print("plan_gpu_check: no CUDA device", file=sys.stderr)
        return 2
    rows = []
    for config in a.configs.split(","):
        for backend in a.backends.split(","):
            res = subprocess.run([sys.executable, __file__, "--one", config, backend, "--batch", str(a.batch),
                                  "--steps", str(a.steps)], capture_output=True, text=True, timeout=900)
            row = (json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0
                   else {"config": config, "backend": backend, "error": res.stderr[-2000:]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
