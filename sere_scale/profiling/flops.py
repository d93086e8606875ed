"""FLOPs of a step (counted once with ``torch.utils.flop_counter``), analytic ViT counts, peak device FLOP/s."""
from __future__ import annotations

import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense peak FLOP/s (no sparsity) by device-name substring, for bf16/fp16 tensor-core math.
PEAK_BF16 = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
    "V100": 125e12, "RTX 4090": 165e12,
}


def _cpu_sdpa_mapping() -> dict:
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash-attention ops: count them with
    torch's own SDPA formulas."""
    from torch.utils import flop_counter as F
    aten = torch.ops.aten
    out = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def fwd(query, key, value, *args, out_val=None, **kwargs):
            return F.sdpa_flop_count(query, key, value)  # shapes (shape-wrapped by torch)

        def bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
            return F.sdpa_backward_flop_count(grad_out, query, key, value)
        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


class _GlobalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker (``mod_tracker``): every FLOP goes to ``"Global"``, the
    only count read here. torch's ``ModuleTracker`` registers gradient hooks on every module's inputs and
    outputs; under non-reentrant activation checkpointing it does so again on the recomputed tensors inside the
    backward, and those hooks, never fired, keep the recomputed activations (and their graphs) alive until the
    end of the backward: +60 % on a step's peak memory at a small size, varying with the garbage collector
    (docs/SCALING.md)."""

    parents = frozenset({"Global"})
    is_bw = False

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


@contextlib.contextmanager
def counting_flops():
    """Yields a one-element list that holds, after the block, the FLOPs of the matmuls/convolutions/attention run
    inside it (forward and backward), the fused Triton relation kernels included (invisible to
    ``FlopCounterMode``; they report their own). No per-module breakdown (``_GlobalOnly``): counting keeps no
    tensor alive."""
    from sere_scale.kernels import tally_kernel_flops
    total = [0]
    fc = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    fc.mod_tracker = _GlobalOnly()
    with tally_kernel_flops() as kernels, fc:
        yield total
    total[0] = int(fc.get_total_flops()) + kernels[0]


def count_flops(fn) -> int:
    """Total FLOPs of ``fn()`` (``counting_flops``)."""
    with counting_flops() as total:
        fn()
    return total[0]


def measured_matmul_peak(device: torch.device, dtype=torch.float32, n: int = 1024, reps: int = 5) -> float:
    """Achieved FLOP/s of a square matmul: the MFU denominator on devices not in the table (e.g. a CPU)."""
    g = torch.Generator().manual_seed(0)  # never draw on the global RNG (exact resume)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def device_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in PEAK_BF16.items():
            if key in name:
                scale = 0.5 if precision == "fp32" else 1.0  # TF32 is half of bf16 on these parts
                return val * scale, f"table:{key}"
        dtype = torch.bfloat16 if precision in ("bf16", "auto") else torch.float32
        return measured_matmul_peak(device, dtype, 4096), "measured-matmul"
    return measured_matmul_peak(device), "measured-matmul"
