"""Run under torchrun: train a tiny model, then check that every rank holds identical student and teacher
weights and identical centers; rank 0 writes a JSON report."""
import json
import sys

import torch
import torch.distributed as dist

from sere_scale.config.load import load_config
from sere_scale.engine.distributed import init_distributed
from sere_scale.run.train import train


def flat(module):
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def main():
    report_path, *overrides = sys.argv[1:]
    info = init_distributed()
    cfg = load_config(None, overrides)
    out = train(cfg, info=info)
    eng = out["engine"]
    checks = {}
    for name, t in (("student", flat(eng.student_module)), ("teacher", flat(eng.teacher_module)),
                    ("center", eng.method.dino.center.flatten() if eng.method.dino is not None  # none: MoCo v3
                     else torch.zeros(1))):
        gathered = [torch.zeros_like(t) for _ in range(info.world_size)]
        dist.all_gather(gathered, t)
        checks[name] = max(float((g - gathered[0]).abs().max()) for g in gathered)
    checks["moved"] = float((flat(eng.student_module) - flat(eng.teacher_module)).abs().max())
    if info.rank == 0:
        json.dump({"world": info.world_size, "step": out["step"], "max_diff": checks}, open(report_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
