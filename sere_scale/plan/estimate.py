"""From traces to plans: per-rank memory, per-step collective bytes and time, compute time, images/s per GPU and
scaling efficiency, at N GPUs and along the curve; DeepSpeed ZeRO-1/2/3 from DeepSpeed's partition
rules (plan/model_states.py), the traced activations and an analytic count of its collectives.

Time model (modelled, not measured; docs/SCALING.md): a collective of B bytes over a group of n ranks takes
``f·B/bw + latency`` with f = 2(n−1)/n (all-reduce), (n−1)/n (all-gather, reduce-scatter), 1 (broadcast); bw is
the within-node bandwidth when the group stays in a node, the per-GPU between-node bandwidth otherwise.
Overlap (``exposed``): a collective is hidden behind compute only when there is compute to hide it behind;
exposed (on the critical path) are the latency-bound ones (< ``OVERLAP_MIN_BYTES``: the vote, centers, SyncBN,
MoCo's small gathers, norms), the step's first large all-gather (the first unit's parameters are needed before
any compute: FSDP2's root, ZeRO-3's first module), its last large gradient reduction (the last bucket or unit
is reduced after the backward's last compute), and ZeRO-1/2's parameter and teacher all-gathers (after the
optimizer step, before the next forward). The others share one link (their times add up) and run beside the
compute: ``step = exposed + max(compute, overlapped)``. Compute = FLOPs / (peak · MFU), or a measured step
scaled by FLOPs (``--calibrate``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sere_scale.plan.comm import TYPES, Collective
from sere_scale.plan.hardware import GPU, USABLE, Links

OVERLAP_MIN_BYTES = 1 << 20
CURVE = (8, 64, 256, 512)
_FRACTION = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
             "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0 if n > 1 else 0.0}


def scaled_group(c: Collective, world: int, to_world: int, gpn: int) -> tuple[int, bool]:
    """(size, crosses nodes) of the group of ``c`` (traced at ``world`` ranks) in a run of ``to_world`` ranks:
    the world group stays the world; a group within one node stays so; a group across nodes (HSDP's replicas)
    grows with the number of nodes."""
    n = len(c.group)
    nodes = {r // gpn for r in c.group}
    if n == world:
        return to_world, to_world > gpn
    if len(nodes) == 1:
        return n, False
    size = max(n * to_world // world, 1)
    return size, size > 1 and to_world > gpn


def exposed(calls, backend: str = "", strategy: str = "") -> set:
    """Indices of ``calls`` (in step order) that no compute can hide (module docstring)."""
    out = {i for i, c in enumerate(calls) if c.nbytes < OVERLAP_MIN_BYTES}
    large = [i for i in range(len(calls)) if i not in out]
    gathers = [i for i in large if calls[i].kind == "all_gather"]
    reductions = [i for i in large if calls[i].kind in ("reduce_scatter", "all_reduce")]
    if backend == "deepspeed" and strategy in ("zero1", "zero2"):
        out.update(gathers)  # after the step: nothing left to compute
    elif gathers:
        out.add(gathers[0])
    if reductions:
        out.add(reductions[-1])
    return out


def comm_time(calls, world: int, to_world: int, links: Links, backend: str = "",
              strategy: str = "") -> tuple[float, float, dict]:
    """(overlapped seconds, exposed seconds, seconds by type) of the collectives at ``to_world`` ranks."""
    over = block = 0.0
    by_type = dict.fromkeys(TYPES, 0.0)
    hidden_never = exposed(calls, backend, strategy)
    for i, c in enumerate(calls):
        n, cross = scaled_group(c, world, to_world, links.gpus_per_node)
        t = _FRACTION[c.kind](n) * c.nbytes / links.bandwidth(cross) + links.latency(n, cross)
        by_type[c.kind] += t
        if i in hidden_never:
            block += t
        else:
            over += t
    return over, block, by_type


@dataclass
class Plan:
    backend: str
    strategy: str
    batch_size: int
    grad_accum: int
    checkpoint_activations: bool
    model_states_bytes: int
    activations_bytes: int
    calls: list
    flops: int
    source: str                     # "traced" or "analytic: ..."
    breakdown: dict = field(default_factory=dict)
    activations_other_ac: int | None = None   # activations with activation checkpointing flipped
    relation_workspace_bytes: int | None = None

    @property
    def peak_bytes(self) -> int:
        return self.model_states_bytes + self.activations_bytes


def compute_seconds(flops: int, gpu: GPU, mfu: float, calibration: dict | None = None) -> float:
    """FLOPs at ``mfu`` of the GPU's peak, or a measured step (``sere-scale profile`` result on one GPU) scaled by
    the FLOPs ratio."""
    if calibration:
        return calibration["step_time_s"] * flops / calibration["flops_per_step"]
    return flops / (gpu.peak_flops * mfu)


def evaluate(plan: Plan, world: int, gpu: GPU, links: Links, mfu: float, calibration=None,
             curve=CURVE) -> dict:
    """The JSON row of one plan (the issue's format plus details)."""
    compute = compute_seconds(plan.flops, gpu, mfu, calibration)
    images = plan.batch_size * plan.grad_accum

    def at(n):
        over, block, by_type = comm_time(plan.calls, world, n, links, plan.backend, plan.strategy)
        step = max(compute, over) + block
        return step, over + block, by_type

    step, comm, by_type = at(world)
    ips = images / step
    single = images / compute
    comm_bytes = dict.fromkeys(TYPES, 0)
    for c in plan.calls:
        comm_bytes[c.kind] += c.nbytes
    return {
        "backend": plan.backend, "strategy": plan.strategy, "source": plan.source,
        "batch_size": plan.batch_size, "grad_accum": plan.grad_accum,
        "checkpoint_activations": plan.checkpoint_activations,
        "fits": plan.peak_bytes <= USABLE * gpu.mem_bytes,
        "per_rank": {"model_states_bytes": plan.model_states_bytes, "activations_bytes": plan.activations_bytes,
                     "peak_bytes": plan.peak_bytes, "model_states": dict(plan.breakdown),
                     "activations_bytes_other_ac": plan.activations_other_ac,
                     "relation_workspace_bytes": plan.relation_workspace_bytes},
        "per_step": {"comm_bytes": comm_bytes, "comm_calls": _calls_by_type(plan.calls),
                     "comm_s_by_type": by_type, "compute_s": compute, "comm_s": comm, "step_s": step,
                     "flops": plan.flops},
        "images_per_s_per_gpu": ips,
        "scaling_efficiency": ips / single,
        "curve": {str(n): {"images_per_s_per_gpu": images / at(n)[0],
                           "scaling_efficiency": compute / at(n)[0]} for n in curve},
    }


def _calls_by_type(calls) -> dict:
    out = dict.fromkeys(TYPES, 0)
    for c in calls:
        out[c.kind] += 1
    return out


def recommend(rows: list) -> int | None:
    """Index of the fitting plan with the most images/s per GPU (ties: the smaller peak); None if none fits."""
    fitting = [i for i, r in enumerate(rows) if r["fits"]]
    if not fitting:
        return None
    return max(fitting, key=lambda i: (round(rows[i]["images_per_s_per_gpu"], 6), -rows[i]["per_rank"]["peak_bytes"]))
