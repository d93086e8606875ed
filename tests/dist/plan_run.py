"""Run under torchrun (2 or 4 ranks, gloo): for each job (config overrides), build the real engine, run two
warm-up training steps, then one step under ``CollectiveCounter`` (bytes per collective type) and report, per
rank, the bytes of the tensors the rank really holds: its local pieces of the student and teacher parameters,
buffers, AdamW states, and the gradients (summed here from the tensors themselves). DeepSpeed engines
(``ds_held``): the low-precision parameter storages (ZeRO-3: the partitions), the fp32 master partitions, the
teacher (ZeRO-3: its partitions and the fp32 copies the EMA updates), the gradient partition buffers, the fp32
gradient partitions AdamW steps on, the reduction buckets. Rank 0 writes the JSON report:
``plan_run.py REPORT JOBS_JSON``.
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


def storages(tensors) -> int:
    """Bytes of the distinct storages under ``tensors`` (views of one flat buffer count once, its padding too)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def ds_held(engine, method) -> dict:
    """What a DeepSpeed rank holds at its optimizer step (module docstring), read when ZeRO's step calls our
    AdamW for the first time."""
    opt = engine.ds.optimizer
    out = {"buffers": sum(local_bytes(b) for m in (engine.student_module, engine.teacher_module, method)
                          for b in m.buffers()),
           "optimizer": sum(local_bytes(v) for st in engine._adamw.state.values() for v in st.values()
                            if torch.is_tensor(v))}
    if engine.stage == 3:
        out["student_params"] = storages(p.ds_tensor for p in engine.student_module.parameters())
        t = [p.ds_tensor for p in engine.teacher_module.parameters()]
        out["teacher_params"] = storages(t) + storages(x for x, y in zip(engine._t32, t) if x is not y)
        out["fp32_masters"] = storages(opt.fp32_partitioned_groups_flat)
        out["gradients"] = local_bytes(opt.grad_partitions_flat_buffer)
        out["reduce_buckets"] = sum(local_bytes(b.buffer) for b in opt.ipg_buckets.values() if b.buffer is not None)
    else:
        out["student_params"] = storages(engine.student_module.parameters())
        out["teacher_params"] = storages(engine.teacher_module.parameters())
        out["fp32_masters"] = storages(opt.single_partition_of_fp32_groups)
        gip = getattr(opt, "grads_in_partition", None)
        out["gradients"] = 0 if gip is None else local_bytes(gip)
        out["reduce_buckets"] = sum(local_bytes(x) for b in opt.ipg_buckets.values() for x in b.buffer)
    return out


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
        ds = cfg.engine.backend == "deepspeed"
        at_step = {}
        if ds:
            def at_adamw(opt, args, kwargs, engine=engine, method=method, at_step=at_step):
                """ZeRO steps our AdamW one param group (sub-group) at a time, each on a fresh fp32 gradient
                partition: the largest is what the step holds at once."""
                g = sum(local_bytes(p.grad) for gr in opt.param_groups for p in gr["params"] if p.grad is not None)
                if not at_step:
                    at_step.update(ds_held(engine, method), step_gradients=g)
                at_step["step_gradients"] = max(at_step["step_gradients"], g)
            engine._adamw.register_step_pre_hook(at_adamw)
        for _ in range(2):  # warm-up: DDP rebuilds its buckets (one broadcast) at the start of the second step
            train_step(engine, method, batches, sched, cfg.train.grad_accum, info.world_size,
                       freeze_last_layer=False)
        counter = CollectiveCounter()
        at_step.clear()
        with counter:
            train_step(engine, method, batches, sched, cfg.train.grad_accum, info.world_size,
                       freeze_last_layer=False)
        mine = {"comm_bytes": bytes_by_type(counter.calls),
                "held": dict(at_step) if ds else held(engine, method, batches, sched)}
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
