"""From traces to plans: per-rank memory, per-step collective bytes and time, compute time, images/s per GPU and
scaling efficiency, at N GPUs and along the curve; DeepSpeed ZeRO-1/2/3 from DeepSpeed's estimators, the
traced activations and an analytic count of its collectives.

Time model (modelled, not measured; docs/SCALING.md): a collective of B bytes over a group of n ranks takes
``f·B/bw + latency`` with f = 2(n−1)/n (all-reduce), (n−1)/n (all-gather, reduce-scatter), 1 (broadcast); bw is
the within-node bandwidth when the group stays in a node, the per-GPU between-node bandwidth otherwise.
Collectives of at least ``OVERLAP_MIN_BYTES`` (parameter all-gathers, gradient reduce-scatters and
all-reduces) overlap with compute; smaller ones (SyncBN, centers, the vote) sit on the critical path:
``step = max(compute, overlapped) + blocking``. Compute = FLOPs / (peak · MFU), or a measured step scaled by
FLOPs (``--calibrate``).
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


def comm_time(calls, world: int, to_world: int, links: Links) -> tuple[float, float, dict]:
    """(overlapped seconds, blocking seconds, seconds by type) of the collectives at ``to_world`` ranks."""
    over = block = 0.0
    by_type = dict.fromkeys(TYPES, 0.0)
    for c in calls:
        n, cross = scaled_group(c, world, to_world, links.gpus_per_node)
        t = _FRACTION[c.kind](n) * c.nbytes / links.bandwidth(cross) + links.latency(n, cross)
        by_type[c.kind] += t
        if c.nbytes >= OVERLAP_MIN_BYTES:
            over += t
        else:
            block += t
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
        over, block, by_type = comm_time(plan.calls, world, n, links)
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
