"""Process-group set-up from the launcher's environment (torchrun, deepspeed, accelerate, Slurm)."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(*names, default=None):
    for n in names:
        if n in os.environ:
            return int(os.environ[n])
    return default


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Reads RANK/WORLD_SIZE/LOCAL_RANK (torchrun, deepspeed and accelerate launchers) or SLURM_PROCID/
    SLURM_NTASKS/SLURM_LOCALID (srun without torchrun); NCCL on CUDA, gloo on CPU. ``timeout_s`` (config
    ``train.dist_timeout_s``): how long a collective or the rendezvous waits for the other ranks."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    # srun with one GPU bound per task shows each task a single device: index by what is visible
    dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs = {}
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if restart != "0":
            # torchrun --max-restarts serves every round from the same store: a restarted group would read the
            # addresses its dead predecessor published there (and hang or fail to connect); give each round
            # its own key space
            store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
            kwargs["store"] = dist.PrefixStore(f"sere_scale/restart_{restart}/", store)
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, timeout=timeout,
                                **kwargs)
    return DistInfo(rank, world, local, dev)


def ranks_per_node(default: int) -> int:
    """Processes on this node, from the launcher: torchrun/accelerate (``LOCAL_WORLD_SIZE``), the deepspeed
    launcher (``LOCAL_SIZE``), srun (``SLURM_NTASKS_PER_NODE``, e.g. ``8`` or ``8(x2)``)."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        v = os.environ.get(name, "")
        digits = v.split("(")[0].split(",")[0]
        if digits.isdigit():
            return int(digits)
    return default


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the output gradients (every rank's input
    contributes to every rank's output)."""

    @staticmethod
    def forward(ctx, t):
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g)
        return g


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum) with autograd, on the public ``dist.all_reduce`` (replaces the deprecated
    ``torch.distributed.nn.functional.all_reduce``); identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    return _AllReduceSum.apply(t)
