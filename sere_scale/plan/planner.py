"""The plans of one config at N GPUs: which backends are traced (DDP, FSDP2 full/grad_op/hybrid) and which are
modelled (DeepSpeed ZeRO-1/2/3: DeepSpeed's estimators + the DDP trace's activations + an analytic count of
its collectives), both settings of activation checkpointing, and smaller batches per GPU (with gradient
accumulation keeping the global batch) when nothing fits."""
from __future__ import annotations

from sere_scale.plan.comm import Collective
from sere_scale.plan.estimate import Plan, evaluate, recommend
from sere_scale.plan.model_states import deepspeed_model_states
from sere_scale.plan.trace import Trace, trace_step

BACKENDS = ("ddp", "fsdp:full", "fsdp:grad_op", "fsdp:hybrid", "deepspeed:1", "deepspeed:2", "deepspeed:3")
# DeepSpeed's bucket size in elements (engine/deepspeed_config.py: reduce/allgather/prefetch buckets)
DS_BUCKET = 50_000_000


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


def _chunks(kind: str, total: int, bucket_bytes: int, group: tuple) -> list:
    out = []
    while total > 0:
        out.append(Collective(kind, min(total, bucket_bytes), group))
        total -= bucket_bytes
    return out


def deepspeed_calls(stage: int, ddp: Trace, accum: int) -> list:
    """DeepSpeed's collectives per optimizer step, counted from the model (analytic): gradients reduce-scattered
    in fp32 (``communication_data_type``); ZeRO-1/2: the updated bf16 parameters all-gathered, the EMA
    teacher's fp32 fragments all-gathered; ZeRO-3: bf16 parameters all-gathered in forward and again in
    backward (no persistence), the teacher's bf16 partitions gathered for its forward. Plus the method's and
    the step's own collectives from the DDP trace, the vote once per micro-batch (DeepSpeed votes before every
    backward)."""
    c, world = ddp.counts, ddp.world
    group = tuple(range(world))
    traced = ddp.calls[:ddp.n_traced]
    vote = [x for x in traced if x.nbytes == 8 and x.kind == "all_reduce"][:1]
    calls = traced + vote * (accum - 1)
    calls += _chunks("reduce_scatter", 4 * c["trainable"], 4 * DS_BUCKET, group)
    if stage in (1, 2):
        calls += _chunks("all_gather", 2 * c["student"], 2 * DS_BUCKET, group)
        calls += _chunks("all_gather", 4 * c["teacher"], 4 * DS_BUCKET, group)
    else:
        calls += _chunks("all_gather", 2 * 2 * c["student"] * accum, 2 * DS_BUCKET, group)
        calls += _chunks("all_gather", 2 * c["teacher"] * accum, 2 * DS_BUCKET, group)
    return calls


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


def _plan_deepspeed(name: str, ddp: Trace, cfg, world: int, gpn: int) -> Plan:
    stage = int(name.partition(":")[2])
    states = deepspeed_model_states(stage, ddp.counts, world, gpn)
    buffers = ddp.held.get("buffers", 0)
    states["buffers"] = buffers
    return Plan("deepspeed", f"zero{stage}", cfg.data.batch_size, cfg.train.grad_accum,
                bool(cfg.model.checkpoint_activations), sum(states.values()), ddp.activations_bytes,
                deepspeed_calls(stage, ddp, cfg.train.grad_accum), ddp.flops,
                "analytic: DeepSpeed estimators + DDP-traced activations + modelled collectives", states)


def _with_other_ac(p: Plan, delta_act: int, delta_flops: int) -> Plan:
    q = Plan(**{**p.__dict__})
    q.checkpoint_activations = not p.checkpoint_activations
    q.activations_bytes = max(p.activations_bytes + delta_act, 0)
    q.flops = p.flops + delta_flops
    q.source = p.source + "; activation checkpointing flipped: activations and FLOPs from the flipped trace"
    return q


def make_plans(load, world: int, gpn: int, backends, mem_limit: float, max_halvings: int = 3,
               log=print) -> list[Plan]:
    """``load(extra_overrides) -> Config``; ``mem_limit``: usable bytes per GPU. Plans at the configured batch
    per GPU, then at halved batches (with doubled accumulation) until something fits, up to ``max_halvings``
    times; each trace is one step."""
    base = load([])
    batch, accum = base.data.batch_size, base.train.grad_accum
    plans_all = []
    for _ in range(max_halvings + 1):
        size = [f"data.batch_size={batch}", f"train.grad_accum={accum}"]
        traced, plans = {}, []
        need = [b for b in backends if not b.startswith("deepspeed")]
        if any(b.startswith("deepspeed") for b in backends) and "ddp" not in need:
            need.append("ddp")
        for name in need:
            if name == "fsdp:hybrid" and (world <= gpn or world % gpn):
                log(f"fsdp:hybrid left out: {world} GPUs are not several nodes of {gpn}")
                continue
            log(f"tracing {name} at {world} ranks, batch {batch}/GPU ...")
            traced[name] = trace_step(load([*size, *backend_overrides(name, gpn)]), world)
        for name in backends:
            if name.startswith("deepspeed"):
                plans.append(_plan_deepspeed(name, traced["ddp"], load([*size, *backend_overrides(name, gpn)]),
                                             world, gpn))
            elif name in traced:
                plans.append(_plan_from_trace(name, traced[name], load([*size, *backend_overrides(name, gpn)])))
        # the other activation-checkpointing setting, traced once (the first traced backend) and applied to all
        first = next(iter(traced))
        cfg = load([*size, *backend_overrides(first, gpn)])
        flip = not cfg.model.checkpoint_activations
        log(f"tracing {first} with model.checkpoint_activations={str(flip).lower()} ...")
        other = trace_step(load([*size, *backend_overrides(first, gpn), f"model.checkpoint_activations={flip}"]),
                           world)
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
