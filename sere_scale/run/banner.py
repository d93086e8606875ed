"""The start-up banner (rank 0): what this run really is — world size and layout, launcher, engine,
precision, devices, batch, steps, data, output folder, resume point — in the log and as the first record
of a run's (or resumed segment's) ``metrics.jsonl`` (``"event": "start"``).

Launcher mistakes show here: ``accelerate launch --cpu --num_processes 2`` starts one process (world size 1,
launcher ``accelerate``, with a warning naming the form that starts several)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from sere_scale.engine.distributed import ranks_per_node

log = logging.getLogger("sere_scale")


def detect_launcher(env=None) -> str:
    """Which launcher started this process, from the environment it sets."""
    env = os.environ if env is None else env
    elastic = "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env
    if any(k.startswith("ACCELERATE_") for k in env):
        return "accelerate (torchrun)" if elastic else "accelerate"
    if elastic:
        return "torchrun"
    if "SLURM_PROCID" in env and "RANK" not in env:
        return "srun"
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        return "mpirun"
    if "LOCAL_SIZE" in env and "RANK" in env:
        return "deepspeed"
    if "RANK" in env:
        return "env (RANK/WORLD_SIZE)"
    return "none (single process)"


def _engine_desc(cfg, engine) -> str:
    e = cfg.engine
    if engine.name == "deepspeed":
        return f"deepspeed ZeRO-{getattr(engine, 'stage', e.zero_stage)}"
    if engine.name == "fsdp":
        return f"fsdp ({e.fsdp_strategy})"
    return engine.name


def _devices(info) -> str:
    dev = info.device
    if dev.type == "cuda":
        return f"{info.world_size} × cuda ({torch.cuda.get_device_name(dev)})"
    return f"{info.world_size} × {dev.type}"


def _data_size(loader) -> int | None:
    if hasattr(loader, "dataset"):
        return len(loader.dataset)
    shardset = getattr(loader, "shardset", None)
    return getattr(shardset, "total", None)


def start_banner(cfg, info, engine, loader, total_steps: int, steps_per_epoch: int, start_step: int,
                 resumed_from=None) -> dict:
    rpn = ranks_per_node(info.world_size)
    accum = cfg.train.grad_accum
    return {
        "world_size": info.world_size,
        "ranks_per_node": rpn,
        "nodes": max(info.world_size // max(rpn, 1), 1),
        "launcher": detect_launcher(),
        "engine": _engine_desc(cfg, engine),
        "precision": engine.precision,
        "devices": _devices(info),
        "global_batch": cfg.data.batch_size * info.world_size * accum,
        "batch_per_rank": cfg.data.batch_size,
        "grad_accum": accum,
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "data": cfg.data.shards or cfg.data.path,
        "data_images": _data_size(loader),
        "output_dir": str(Path(cfg.output_dir).resolve()),
        "resume": {"step": start_step, "checkpoint": str(resumed_from)} if resumed_from else None,
    }


def format_banner(b: dict) -> str:
    resume = (f"step {b['resume']['step']} from {b['resume']['checkpoint']}" if b["resume"]
              else "none (fresh start)")
    return "\n".join([
        "sere_scale training run",
        f"  world size    {b['world_size']} ({b['ranks_per_node']} ranks/node, {b['nodes']} node(s)); "
        f"launcher {b['launcher']}",
        f"  engine        {b['engine']}; precision {b['precision']}; devices {b['devices']}",
        f"  global batch  {b['global_batch']} ({b['batch_per_rank']}/rank × {b['world_size']} ranks × "
        f"{b['grad_accum']} accumulation)",
        f"  steps         {b['steps']} ({b['steps_per_epoch']} per epoch)",
        f"  data          {b['data']} ({b['data_images']} images)",
        f"  output_dir    {b['output_dir']}",
        f"  resume        {resume}",
        *([f"  init_from     {b['init_from']['source']} ({b['init_from']['loaded']} tensors; random: "
           f"{', '.join(b['init_from']['kept_random']) or 'none'})"] if b.get("init_from") else []),
    ])


def log_banner(b: dict) -> None:
    log.info("%s", format_banner(b))
    if b["world_size"] == 1 and b["launcher"] == "accelerate" and os.environ.get("ACCELERATE_USE_CPU"):
        log.warning("accelerate launch --cpu started a single process (world size 1). For several CPU "
                    "processes use: accelerate launch --config_file configs/accelerate/single_node.yaml "
                    "--num_processes N -m sere_scale train ... (docs/LAUNCH.md)")
