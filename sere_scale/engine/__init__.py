"""Engines and the process around them: one engine per backend (``ddp.py``, ``fsdp.py``,
``deepspeed.py``: wrap, backward, step, EMA teacher update, state save/load; ``base.py`` the interface), the
readers of each backend's checkpoints (``readers.py``), atomic checkpoint folders (``checkpoint.py``), process
group set-up from the launcher's environment (``distributed.py``), the precision table (``precision.py``) and
the machine's capability probes (``capabilities.py``).

Imports: ``config`` only: never the method, losses, models or data (engines know a network only through its
``parallel_plan()``). Imported by: run, models (run-folder readers, synchronised BatchNorm), profiling,
commands.
"""
from sere_scale.engine.base import Engine


def build_engine(cfg, student, teacher, method, info) -> Engine:
    backend = cfg.engine.backend
    if backend == "ddp":
        from sere_scale.engine.ddp import DDPEngine
        return DDPEngine(cfg, student, teacher, method, info)
    if backend == "fsdp":
        from sere_scale.engine.fsdp import FSDPEngine
        return FSDPEngine(cfg, student, teacher, method, info)
    if backend == "deepspeed":
        from sere_scale.engine.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(cfg, student, teacher, method, info)
    raise ValueError(f"config key 'engine.backend': unknown backend '{backend}'")


__all__ = ["Engine", "build_engine"]
