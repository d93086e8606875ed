"""Engines: wrap, backward, step, EMA update, state save/load. One per backend; train.py never branches."""
from .base import Engine


def build_engine(cfg, student, teacher, method, info) -> Engine:
    backend = cfg.engine.backend
    if backend == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(cfg, student, teacher, method, info)
    if backend == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(cfg, student, teacher, method, info)
    if backend == "deepspeed":
        from .deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, student, teacher, method, info)
    raise ValueError(f"config key 'engine.backend': unknown backend '{backend}'")


__all__ = ["Engine", "build_engine"]
