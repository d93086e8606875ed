"""How long ``sere-scale plan`` takes at N = 512 GPUs on this CPU (issue 25: under a minute on 2 cores).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/plan_speed.py [-c CONFIG] [--gpus 512]
        [--backends configured|all|LIST] [--json out.json] [key=value ...]

Times one whole plan (every trace, the estimates and the report) in this process, as wall-clock seconds and as
CPU seconds of this process (on a shared machine the CPU seconds are the figure to compare), and the seconds
of each trace (one ``train_step`` under fake tensors).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from sere_scale.commands import plan as plan_cmd


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", action="append", default=[])
    ap.add_argument("--gpus", type=int, default=512)
    ap.add_argument("--backends", default="configured")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if not a.config:
        a.config = ["configs/ibot_sere_vit_b16.yaml"]
    args = argparse.Namespace(config=a.config, overrides=a.overrides, gpus=a.gpus, gpus_per_node=8, gpu="h100",
                              gpu_mem_gib=None, gpu_tflops=None, hbm_gbs=None, intra_gbs=400.0, inter_gbs=50.0,
                              mfu=0.4, calibrate=None, backends=a.backends)
    marks = []

    def log(msg):
        marks.append((time.perf_counter(), _cpu(), msg))
        print(msg, file=sys.stderr)
    import sere_scale.plan.trace  # noqa: F401  (imports outside the timing: torch, timm, DeepSpeed)
    w0, c0 = time.perf_counter(), _cpu()
    res = plan_cmd.build_result(args, log=log)
    wall, cpu = time.perf_counter() - w0, _cpu() - c0
    out = {"config": a.config, "gpus": a.gpus, "backends": a.backends, "plans": len(res["plans"]),
           "wall_s": wall, "cpu_s": cpu, "traces": len(marks)}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
