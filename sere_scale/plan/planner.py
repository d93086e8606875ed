"""The plans of one config at N GPUs: which backends are traced (DDP, FSDP2 full/grad_op/hybrid) and which are
modelled (DeepSpeed ZeRO-1/2/3: DeepSpeed's own partitioning and collective rules applied to the model's layout,
exact in bytes, + the DDP trace's activations and method collectives), both settings of activation
checkpointing, and smaller batches per GPU (with gradient accumulation keeping the global batch) when nothing
fits."""
from __future__ import annotations

import torch

from sere_scale.plan.comm import Collective
from sere_scale.plan.estimate import Plan, evaluate, recommend
from sere_scale.plan.model_states import (ZeroLayout, called_modules, deepspeed_model_states, zero12_partitions,
                                          zero3_partition, zero_layout)
from sere_scale.plan.parallel import cpu_cores, run_jobs
from sere_scale.plan.trace import Trace, trace_step

BACKENDS = ("ddp", "fsdp:full", "fsdp:grad_op", "fsdp:hybrid", "deepspeed:1", "deepspeed:2", "deepspeed:3")


def backend_overrides(name: str, gpus_per_node: int) -> list[str]:
    kind, _, sub = name.partition(":")
    if kind == "ddp":
        return ["engine.backend=ddp"]
    if kind == "fsdp":
        return ["engine.backend=fsdp", f"engine.fsdp_strategy={sub}", f"engine.fsdp_node_size={gpus_per_node}"]
    if kind == "deepspeed":
        return ["engine.backend=deepspeed", f"engine.zero_stage={sub}"]
    raise ValueError(f"--backends: unknown backend '{name}' (one of {', '.join(BACKENDS)})")


def configured_backend(cfg) -> str:
    e = cfg.engine
    return {"ddp": "ddp", "fsdp": f"fsdp:{e.fsdp_strategy}", "deepspeed": f"deepspeed:{e.zero_stage}"}[e.backend]


def _chunks(kind: str, elems: int, bucket: int, elem_bytes: int, group: tuple) -> list:
    """``elems`` elements moved in calls of at most ``bucket`` elements (DeepSpeed's bucket sizes)."""
    out = []
    while elems > 0:
        out.append(Collective(kind, elem_bytes * min(elems, bucket), group))
        elems -= bucket
    return out


# run/step.py _vote: one all-reduce of three fp32 flags; DeepSpeed votes before every micro-batch's backward
VOTE_BYTES = 3 * 4
_DS_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def deepspeed_calls(stage: int, ddp: Trace, layout: ZeroLayout, accum: int, ds: dict, lowp_bytes: int) -> list:
    """DeepSpeed's collectives per optimizer step, by DeepSpeed's own rules (deepspeed 0.19, checked against real
    gloo ranks in tests/test_plan_exact.py), plus the method's and the step's own collectives traced under DDP
    (one vote per micro-batch instead of one per step). ``ds``: our generated DeepSpeed config (bucket sizes,
    ``communication_data_type``); ``lowp_bytes``: the element size of the compute parameters.

    * ZeRO-1/2: the gradients all-reduced in the communication dtype (DeepSpeed's ZeRO-1/2 "reduce-scatter" is an
      all-reduce of each bucket, ``use_multi_rank_bucket_allreduce``), unpadded, once per step (ZeRO-1: at the
      accumulation boundary) or once per micro-batch (ZeRO-2); at the step an overflow flag (1 byte, bf16/fp16
      only) and one fp32 norm per param group all-reduced; the updated parameters all-gathered (each group's
      flat buffer padded to 2 × world elements); the EMA teacher's fp32 fragments all-gathered
      (``engine/deepspeed.py``'s ``_FragmentEMA``: world × the largest rank's fragments).
    * ZeRO-3, per micro-batch: the teacher's and the student's parameters gathered once each (those of modules
      that run, each parameter padded to a multiple of world; they stay gathered from the forward through the
      backward: DeepSpeed's ``stage3_max_live_parameters`` / ``max_reuse_distance`` of 1e9 elements exceed our
      models), the gradients reduce-scattered in the communication dtype (padded likewise); at the step one
      fp64 norm per param group (one ZeRO-3 sub-group each, below ``sub_group_size`` = 1e9 elements per rank).

    Bytes per type are DeepSpeed's to the byte; the split into calls follows the bucket sizes (modelled)."""
    world = ddp.world
    group = tuple(range(world))
    zo = ds["zero_optimization"]
    comm = _DS_DTYPE_BYTES[ds["communication_data_type"]] if "communication_data_type" in ds else lowp_bytes
    calls = ddp.calls[:ddp.n_traced] + [Collective("all_reduce", VOTE_BYTES, group)] * (accum - 1)
    trainable = [n for g in layout.groups for n in g]
    if stage in (1, 2):
        for _ in range(accum if stage == 2 else 1):
            calls += _chunks("all_reduce", sum(trainable), int(zo["reduce_bucket_size"]), comm, group)
        calls += [Collective("all_reduce", 1, group)] * (lowp_bytes < 4)
        calls += [Collective("all_reduce", 4, group)] * len(layout.groups)
        parts = zero12_partitions(layout, world)
        for n in parts:
            calls += _chunks("all_gather", world * n, int(zo["allgather_bucket_size"]), lowp_bytes, group)
        if world > 1:
            width = max(sum(min(n, max(0, sum(g) - r * n)) for g, n in zip(layout.groups, parts))
                        for r in range(world))
            calls.append(Collective("all_gather", 4 * world * width, group))
        return calls
    prefetch = int(zo.get("stage3_prefetch_bucket_size", zo["reduce_bucket_size"]))
    for _ in range(accum):
        for used in (layout.teacher_used, layout.student_used):
            calls += _chunks("all_gather", world * zero3_partition(used, world), prefetch, lowp_bytes, group)
        calls += _chunks("reduce_scatter", world * zero3_partition(trainable, world), int(zo["reduce_bucket_size"]),
                         comm, group)
    return calls + [Collective("all_reduce", 8, group)] * len(layout.groups)


def relation_workspace_bound() -> int:
    """The chunked relation kernel's documented transient bound (kernels/chunked.py: about three fp32 slabs of
    its CUDA block live at once), part of the activations peak; the fused Triton kernel keeps less."""
    from sere_scale.kernels.chunked import DEFAULT_BLOCK_ELEMS_CUDA
    return 3 * 4 * DEFAULT_BLOCK_ELEMS_CUDA


def _plan_from_trace(name: str, tr: Trace, cfg) -> Plan:
    kind, _, sub = name.partition(":")
    return Plan(kind, sub or "replicate", cfg.data.batch_size, cfg.train.grad_accum,
                bool(cfg.model.checkpoint_activations), tr.model_states_bytes, tr.activations_bytes, tr.calls,
                tr.flops, "traced" + ("; " + "; ".join(tr.notes) if tr.notes else ""), dict(tr.held))


DS_SOURCE = ("analytic: DeepSpeed's partitioning and collective rules (deepspeed 0.19) applied to the model's "
             "param groups: collective bytes per type and model states exact (checked on real gloo ranks); call "
             "splits by bucket modelled; activations from the DDP trace; ZeRO-1/2's reduce buckets during the "
             "backward not counted")


def plan_deepspeed(name: str, ddp: Trace, layout: ZeroLayout, cfg, world: int) -> Plan:
    """The plan of ``deepspeed:STAGE`` from the DDP trace of the same config and the model's ``ZeroLayout``.
    Precision ``auto`` is planned as on the GPUs (bf16)."""
    from sere_scale.engine.deepspeed_config import deepspeed_config
    from sere_scale.engine.precision import lowp_dtype, resolve_precision
    stage = int(name.partition(":")[2])
    precision = resolve_precision(cfg.train.precision, torch.device("cuda"))
    ds = deepspeed_config(cfg, world, precision)
    lowp = lowp_dtype(precision)
    lowp_bytes = 4 if lowp is None else lowp.itemsize
    comm = _DS_DTYPE_BYTES[ds["communication_data_type"]] if "communication_data_type" in ds else lowp_bytes
    states = deepspeed_model_states(stage, layout, world, lowp_bytes, comm,
                                    int(ds["zero_optimization"]["reduce_bucket_size"]))
    states["buffers"] = ddp.held.get("buffers", 0)
    return Plan("deepspeed", f"zero{stage}", cfg.data.batch_size, cfg.train.grad_accum,
                bool(cfg.model.checkpoint_activations), sum(states.values()), ddp.activations_bytes,
                deepspeed_calls(stage, ddp, layout, cfg.train.grad_accum, ds, lowp_bytes), ddp.flops, DS_SOURCE,
                states)


def trace_with_layout(cfg, world: int) -> tuple:
    """``trace_step`` of a DDP config with the modules it ran recorded: (Trace, ZeroLayout)."""
    with called_modules() as called:
        tr = trace_step(cfg, world)
    return tr, zero_layout(called)


def _with_other_ac(p: Plan, delta_act: int, delta_flops: int) -> Plan:
    q = Plan(**{**p.__dict__})
    q.checkpoint_activations = not p.checkpoint_activations
    q.activations_bytes = max(p.activations_bytes + delta_act, 0)
    q.flops = p.flops + delta_flops
    q.source = p.source + "; activation checkpointing flipped: activations and FLOPs from the flipped trace"
    return q


def make_plans(load, world: int, gpn: int, backends, mem_limit: float, max_halvings: int = 3,
               log=print, processes: int | None = None) -> list[Plan]:
    """``load(extra_overrides) -> Config``; ``mem_limit``: usable bytes per GPU. Plans at the configured batch
    per GPU, then at halved batches (with doubled accumulation) until something fits, up to ``max_halvings``
    times; each trace is one step, the traces of one batch size run side by side in up to ``processes``
    processes (``parallel.run_jobs``; default one per core)."""
    base = load([])
    batch, accum = base.data.batch_size, base.train.grad_accum
    plans_all = []
    for _ in range(max_halvings + 1):
        size = [f"data.batch_size={batch}", f"train.grad_accum={accum}"]
        traced, plans, layout = {}, [], None
        need = [b for b in backends if not b.startswith("deepspeed")]
        if any(b.startswith("deepspeed") for b in backends) and "ddp" not in need:
            need.append("ddp")
        if "fsdp:hybrid" in need and (world <= gpn or world % gpn):
            log(f"fsdp:hybrid left out: {world} GPUs are not several nodes of {gpn}")
            need.remove("fsdp:hybrid")
        # the other activation-checkpointing setting, traced once (the first traced backend) and applied to all
        first = need[0]
        flip = not load([*size, *backend_overrides(first, gpn)]).model.checkpoint_activations
        jobs = {name: (trace_with_layout if name == "ddp" else trace_step,
                       (load([*size, *backend_overrides(name, gpn)]), world)) for name in need}
        jobs["flipped"] = (trace_step, (load([*size, *backend_overrides(first, gpn),
                                              f"model.checkpoint_activations={flip}"]), world))
        log(f"tracing {', '.join(need)} at {world} ranks, batch {batch}/GPU, and {first} with "
            f"model.checkpoint_activations={str(flip).lower()} ({min(len(jobs), processes or cpu_cores())} "
            "processes) ...")
        order = sorted(jobs, key=lambda k: not k.startswith("fsdp"))  # the longest traces first
        done = dict(zip(order, run_jobs([jobs[k] for k in order], processes)))
        other = done.pop("flipped")
        for name, res in done.items():
            traced[name], layout = res if name == "ddp" else (res, layout)
        traced = {name: traced[name] for name in need}
        for name in backends:
            if name.startswith("deepspeed"):
                plans.append(plan_deepspeed(name, traced["ddp"], layout, load([*size, *backend_overrides(name, gpn)]),
                                            world))
            elif name in traced:
                plans.append(_plan_from_trace(name, traced[name], load([*size, *backend_overrides(name, gpn)])))
        d_act = other.activations_bytes - traced[first].activations_bytes
        d_flops = other.flops - traced[first].flops
        for p in list(plans):
            q = _with_other_ac(p, d_act, d_flops)
            p.activations_other_ac, q.activations_other_ac = q.activations_bytes, p.activations_bytes
            plans.append(q)
        for p in plans:
            p.relation_workspace_bytes = relation_workspace_bound()
        plans_all += plans
        if any(p.peak_bytes <= mem_limit for p in plans) or batch % 2:
            break
        batch, accum = batch // 2, accum * 2
    return plans_all


def plan_rows(plans, world, gpu, links, mfu, calibration=None):
    rows = [evaluate(p, world, gpu, links, mfu, calibration) for p in plans]
    return rows, recommend(rows)
