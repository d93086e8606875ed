"""How long ``sere-scale plan`` takes at N = 512 GPUs on this CPU (issue 25: under a minute on 2 cores).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/plan_speed.py [-c CONFIG] [--gpus 512]
        [--backends configured|all|LIST] [--processes P] [--json out.json] [key=value ...]

Times one whole plan (every trace, the estimates and the report), as wall-clock seconds and as CPU seconds of
this process and its trace workers (``plan/parallel.py``: one per core), and the machine's load average over
the last minute before and after (on a shared machine the wall-clock figure means something only when the
load stays below the number of cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from sere_scale.commands import plan as plan_cmd
from sere_scale.plan.parallel import cpu_cores


def _cpu() -> float:
    """CPU seconds of this process and of its finished children. The trace workers are the fork server's
    children (plan/parallel.py), not this process's: with more than one process their CPU time is not in it."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", action="append", default=[])
    ap.add_argument("--gpus", type=int, default=512)
    ap.add_argument("--backends", default="configured")
    ap.add_argument("--processes", type=int, help="trace workers (default: one per core)")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if not a.config:
        a.config = ["configs/ibot_sere_vit_b16.yaml"]
    args = argparse.Namespace(config=a.config, overrides=a.overrides, gpus=a.gpus, gpus_per_node=8, gpu="h100",
                              gpu_mem_gib=None, gpu_tflops=None, hbm_gbs=None, intra_gbs=400.0, inter_gbs=50.0,
                              mfu=0.4, calibrate=None, backends=a.backends, processes=a.processes)
    def log(msg):
        print(msg, file=sys.stderr)
    import sere_scale.plan.trace  # noqa: F401  (imports outside the timing: torch, timm, DeepSpeed)
    load0 = os.getloadavg()[0]
    w0, c0 = time.perf_counter(), _cpu()
    res = plan_cmd.build_result(args, log=log)
    wall, cpu = time.perf_counter() - w0, _cpu() - c0
    out = {"config": a.config, "gpus": a.gpus, "backends": a.backends, "plans": len(res["plans"]),
           "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "processes": a.processes or cpu_cores(),
           "cores": cpu_cores(), "load_1min_before_after": [load0, os.getloadavg()[0]]}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
