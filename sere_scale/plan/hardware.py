"""GPUs and links the plan predicts for: memory, dense bf16 peak FLOP/s (the profiler's table), HBM bandwidth;
bandwidth within a node (NVLink) and between nodes (per GPU), and the latency of one collective call."""
from __future__ import annotations

import math
from dataclasses import dataclass

from sere_scale.profiling.flops import PEAK_BF16

GIB = 1 << 30


@dataclass(frozen=True)
class GPU:
    name: str
    mem_bytes: int
    peak_flops: float      # dense bf16
    hbm_gbs: float


# memory (GiB), peak key in PEAK_BF16, HBM GB/s (vendor data sheets, SXM parts)
_TABLE = {"h100": ("H100 SXM 80GB", 80, "H100 SXM", 3350), "h200": ("H200 SXM 141GB", 141, "H200", 4800),
          "a100-80g": ("A100 SXM 80GB", 80, "A100", 2039), "a100-40g": ("A100 SXM 40GB", 40, "A100", 1555),
          "b200": ("B200 192GB", 192, "B200", 8000)}
GPU_NAMES = (*_TABLE, "custom")

# Usable share of a GPU's memory: the CUDA context, NCCL buffers and allocator fragmentation take the rest.
USABLE = 0.92


def gpu_spec(name: str, mem_gib: float | None = None, tflops: float | None = None,
             hbm_gbs: float | None = None) -> GPU:
    """A GPU of the table (values may be overridden), or ``custom`` with all three given."""
    if name == "custom":
        if None in (mem_gib, tflops, hbm_gbs):
            raise ValueError("--gpu custom needs --gpu-mem-gib, --gpu-tflops and --hbm-gbs")
        return GPU("custom", int(mem_gib * GIB), tflops * 1e12, hbm_gbs)
    if name not in _TABLE:
        raise ValueError(f"--gpu: unknown GPU '{name}' (one of {', '.join(GPU_NAMES)})")
    label, mem, key, hbm = _TABLE[name]
    return GPU(label, int((mem_gib or mem) * GIB), tflops * 1e12 if tflops else PEAK_BF16[key], hbm_gbs or hbm)


@dataclass(frozen=True)
class Links:
    gpus_per_node: int = 8
    intra_gbs: float = 400.0   # GB/s per GPU within a node (NVLink 4: 450 per direction; NCCL bus bandwidth)
    inter_gbs: float = 50.0    # GB/s per GPU between nodes (400 Gb/s InfiniBand/RoCE per GPU)
    latency_intra_s: float = 10e-6
    latency_inter_s: float = 20e-6

    def bandwidth(self, crosses_nodes: bool) -> float:
        return (self.inter_gbs if crosses_nodes else self.intra_gbs) * 1e9

    def latency(self, size: int, crosses_nodes: bool) -> float:
        """One call's fixed cost: a per-hop latency times log2 of the group (tree/ring start-up)."""
        if size <= 1:
            return 0.0
        return (self.latency_inter_s if crosses_nodes else self.latency_intra_s) * math.ceil(math.log2(size))
