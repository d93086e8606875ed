"""DeepSpeed's JSON config, generated from ours (``deepspeed_config``), with ``engine.deepspeed_config`` merged on
top: micro-batch, gradient accumulation, bf16/fp16 (dynamic loss scaling as torch's GradScaler), ZeRO stage,
global-norm clipping; a user JSON may not define an optimizer or a scheduler."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from sere_scale.engine.precision import lowp_dtype

log = logging.getLogger("sere_scale")


def _merge(base: dict, top: dict, path: str = "") -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{path}{k}.")
        else:
            if k in out and out[k] != v:
                log.info("deepspeed config: '%s%s' = %r from engine.deepspeed_config (generated: %r)", path, k, v,
                         out[k])
            out[k] = v
    return out


def deepspeed_config(cfg, world_size: int, precision: str) -> dict:
    """DeepSpeed's JSON config from ours, with ``engine.deepspeed_config`` (a JSON file) merged on top."""
    from sere_scale.config.load import ConfigError
    z = cfg.engine.zero_stage
    zero = {"stage": z, "contiguous_gradients": True, "overlap_comm": torch.cuda.is_available(),
            "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
    if z == 3:
        # partition every parameter (small ones too): identical student/teacher partitions, 1/N memory
        zero.update(stage3_param_persistence_threshold=0, stage3_model_persistence_threshold=0,
                    stage3_prefetch_bucket_size=50_000_000)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # dynamic loss scaling as under DDP/FSDP (torch's GradScaler): halved at every overflow (hysteresis 1),
        # doubled after train.loss_scale_window steps without one
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": int(math.log2(cfg.train.loss_scale_init)),
                 "loss_scale_window": int(cfg.train.loss_scale_window), "hysteresis": 1, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if lowp_dtype(precision) is not None:
        ds["communication_data_type"] = "fp32"  # gradients reduced in fp32
    user = cfg.engine.deepspeed_config
    if user:
        p = Path(user)
        if not p.exists():
            raise ConfigError(f"config key 'engine.deepspeed_config': file '{p}' does not exist")
        try:
            extra = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config key 'engine.deepspeed_config': '{p}' is not valid JSON ({e})") from e
        for key in ("optimizer", "scheduler"):
            if key in extra:
                raise ConfigError(f"config key 'engine.deepspeed_config': '{p}' defines '{key}'; sere_scale "
                                  f"passes its own AdamW and sets lr/weight decay every step (optim.*)")
        ds = _merge(ds, extra)
    zo = ds["zero_optimization"]
    if ds.get("bf16", {}).get("check_grad_overflow") is False or zo.get("compute_grad_norm") is False:
        # ZeRO's global-norm check is what keeps a non-finite gradient from being applied (run/step.py)
        raise ConfigError("config key 'engine.deepspeed_config': bf16.check_grad_overflow and "
                          "zero_optimization.compute_grad_norm must stay true (a non-finite gradient would be applied)")
    if ds["zero_optimization"].get("stage") not in (1, 2, 3):
        raise ConfigError("config key 'engine.deepspeed_config': zero_optimization.stage must be 1, 2 or 3")
    return ds
