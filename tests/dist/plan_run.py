"""Run under torchrun (2 ranks, gloo): for each job (config overrides), build the real engine, run one warm-up
training step, then one step under ``CollectiveCounter`` (bytes per collective type) and report, per rank, the
bytes of the tensors the rank really holds: its local pieces of the student and teacher parameters, buffers,
AdamW states, and the gradients one backward leaves (summed here from the tensors themselves). Rank 0 writes
the JSON report: ``plan_run.py REPORT JOBS_JSON``.
"""
import json
import sys

import torch
import torch.distributed as dist

from sere_scale.config.load import load_config
from sere_scale.data.synthetic import SyntheticLoader
from sere_scale.engine.distributed import init_distributed
from sere_scale.models.backbone import patch_size_of
from sere_scale.plan.comm import CollectiveCounter, bytes_by_type
from sere_scale.method.schedules import build_schedules
from sere_scale.run.startup import build_parts
from sere_scale.run.step import Batches, train_step


def local_bytes(t) -> int:
    if hasattr(t, "to_local"):
        t = t.to_local()
    return t.numel() * t.element_size()


def held(engine, method, batches, sched) -> dict:
    out = {"student_params": sum(local_bytes(p) for p in engine.student_module.parameters()),
           "teacher_params": sum(local_bytes(p) for p in engine.teacher_module.parameters()),
           "buffers": sum(local_bytes(b) for m in (engine.student_module, engine.teacher_module, method)
                          for b in m.buffers()),
           "optimizer": sum(local_bytes(v) for st in engine.optimizer.state.values() for v in st.values()
                            if torch.is_tensor(v))}
    # one more forward/backward: the gradients as the engine leaves them for the optimizer
    batch = batches.next()
    with engine.autocast():
        loss = method(engine.student, engine.teacher, batch, sched)["loss"]
    engine.backward(loss)
    out["gradients"] = sum(local_bytes(p.grad) for g in engine.optimizer.param_groups for p in g["params"]
                           if p.grad is not None)
    engine.zero_grad()
    method.discard_pending()
    return out


def main(report, jobs_file):
    info = init_distributed()
    results = {}
    for job in json.loads(open(jobs_file).read()):
        cfg = load_config(None, job["overrides"])
        method, engine = build_parts(cfg, info)
        loader = SyntheticLoader(cfg, patch_size_of(cfg.model))
        batches = Batches(loader, {"epoch": 0, "batch": 0}, info.device)
        sched = build_schedules(cfg, 1000, info.world_size).at(1000)
        for _ in range(2):  # warm-up: DDP rebuilds its buckets (one broadcast) at the start of the second step
            train_step(engine, method, batches, sched, cfg.train.grad_accum, info.world_size,
                       freeze_last_layer=False)
        counter = CollectiveCounter()
        with counter:
            train_step(engine, method, batches, sched, cfg.train.grad_accum, info.world_size,
                       freeze_last_layer=False)
        mine = {"comm_bytes": bytes_by_type(counter.calls), "held": held(engine, method, batches, sched)}
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
        results[job["name"]] = every
        dist.barrier()
    if info.rank == 0:
        with open(report, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
