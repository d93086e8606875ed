"""Reading a DeepSpeed checkpoint's teacher or student in one process (no process group, no DeepSpeed engine):
``engine/readers.py`` dispatches here for checkpoints whose meta.json names the ``deepspeed`` backend."""
from __future__ import annotations

from pathlib import Path

import torch

DS_TAG = "deepspeed"  # the tag DeepSpeed's save_checkpoint writes under (and the ``latest`` file names)
TEACHER_FILE = "teacher.pt"


def read_deepspeed_teacher(ckpt_dir: str | Path) -> dict:
    """The full fp32 teacher state dict of a DeepSpeed checkpoint: ``teacher.pt`` (ZeRO-1/2), or the ZeRO-3
    per-rank fp32 partitions concatenated, truncated to each parameter's size and reshaped."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / TEACHER_FILE).exists():
        return torch.load(ckpt_dir / TEACHER_FILE, map_location="cpu", weights_only=False)
    files = sorted(ckpt_dir.glob("teacher_rank*.pt"))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed teacher in {ckpt_dir}")
    shards = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    world = shards[0]["world_size"]
    if len(shards) != world:
        raise RuntimeError(f"{ckpt_dir}: {len(shards)} teacher partitions for a world size of {world}")
    out = {}
    for i, (name, shape) in enumerate(zip(shards[0]["names"], shards[0]["shapes"])):
        flat = torch.cat([s["partitions"][i] for s in shards])
        n = 1
        for d in shape:
            n *= d
        out[name] = flat[:n].view(shape).clone()
    out.update(shards[0]["buffers"])
    return out


def read_deepspeed_student(ckpt_dir: str | Path) -> dict:
    """The full fp32 student state dict (DeepSpeed's fp32 masters), by DeepSpeed's own converter."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DS_TAG)
